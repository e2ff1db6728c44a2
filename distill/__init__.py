"""distill: 2D teachers, rendering, knowledge units, the 3D student and PartDistill training.

Not implemented yet (issues "Views, 2D teachers and knowledge units" and "Student network and the
PartDistill trainer"). It may import :mod:`gen3d`; :mod:`gen3d` never imports it.
"""

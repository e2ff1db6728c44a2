"""distill: 2D teachers, rendering, knowledge units, the 3D student and PartDistill training.

Modules and their data contracts: docs/distill-design.md. Command line: ``distill`` (:mod:`distill.cli`).
It may import :mod:`gen3d`; :mod:`gen3d` never imports it.
"""

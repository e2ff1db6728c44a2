"""eval: part mIoU, 2D mIoU, mesh transfer (Labeled-PSB, COSEG) and generation metrics.

Not implemented yet (issue "Evaluation, and the whole pipeline on real data"). It may import
:mod:`gen3d` and :mod:`distill`; neither imports it. Its command line must not be called ``eval``.
"""

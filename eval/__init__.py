"""eval: part mIoU, 2D mIoU, mesh transfer (Labeled-PSB, COSEG), generation metrics, and the
end-to-end experiments that write ``RESULTS.md``.

Command line: ``pdeval`` (:mod:`eval.cli`; not ``eval``). It may import :mod:`gen3d` and
:mod:`distill`; neither imports it.
"""

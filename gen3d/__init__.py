"""gen3d: shape generation, surfaces, shape collections and dataset readers.

Modules: :mod:`gen3d.collection` (the HDF5 shape-collection format), :mod:`gen3d.readers`
(Labeled-PSB, PSB, ShapeNetPart, COSEG, unlabelled meshes and point clouds), :mod:`gen3d.procedural`
(procedural labelled shapes), :mod:`gen3d.sampling` (surface sampling, FPS), :mod:`gen3d.pool`
and the ``gen3d`` command line (:mod:`gen3d.cli`).
"""
__version__ = "0.1.0"

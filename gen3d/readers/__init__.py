"""Readers that turn datasets in their published layouts into :class:`gen3d.records.ShapeRecord`.

* :mod:`.psb` — Labeled PSB (Kalogerakis et al. 2010; semantic per-face labels) and PSB
  (Chen et al. 2009; human, non-semantic segmentations).
* :mod:`.shapenetpart` — ShapeNetPart (Yi et al. 2016): v0, normal-txt and HDF5 layouts, splits.
* :mod:`.coseg` — COSEG (Wang et al. 2012): ``.off`` + per-face ``.seg`` per set.
* :mod:`.meshes` — unlabelled meshes / point clouds and ShapeNetCore's layout.

Meshes become points by area-weighted surface sampling that carries each sample's face label
(:func:`gen3d.sampling.sample_surface`); the mesh is kept in the record. Malformed files raise
:class:`gen3d.errors.DataFormatError` naming the file and field.
"""
from ._common import default_data_root, mesh_record, shape_seed

__all__ = ["default_data_root", "mesh_record", "shape_seed"]

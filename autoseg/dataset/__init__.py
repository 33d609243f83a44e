"""Reading a raw dataset as it is: layout discovery, checking and fingerprinting (torch-free).

* :mod:`~autoseg.dataset.layout` — the nnU-Net v2 and MSD layouts: ``dataset.json``, labels,
  channels, cases (:func:`~autoseg.dataset.layout.load_dataset`), and unlabelled image folders
  (:func:`~autoseg.dataset.layout.discover_images`).
* :mod:`~autoseg.dataset.scan` — one read of every case, shared by the check and the fingerprint;
  worker count from free memory.
* :mod:`~autoseg.dataset.check` — the per-case checks behind ``autoseg check`` (every problem, one
  row each).
* :mod:`~autoseg.dataset.fingerprint` — spacing, shapes, intensities, class statistics.
* :mod:`~autoseg.dataset.kinds` — what each task's raw dataset looks like (``labelsTr`` or
  ``targetsTr``), read by the stages below the task seam.
* :mod:`~autoseg.dataset.restoration` — a restoration target's checks and the body mask that
  stands in for labels.

Images are read and written through :mod:`autoseg.imageio`, which every stage can reach.
"""

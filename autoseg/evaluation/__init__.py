"""Scoring and choosing: everything that reads predictions and references from files (torch-free).

* :mod:`~autoseg.evaluation.evaluate` — ``autoseg evaluate PRED REF``: per case and label metrics
  (the task's :meth:`~autoseg.tasks.base.Task.score_case`; the metric functions themselves are the
  leaf :mod:`autoseg.metrics`) -> JSON, CSV and a summary (:func:`~autoseg.evaluation.evaluate.run`).
* :mod:`~autoseg.evaluation.restoration` — ``autoseg evaluate`` for denoising and super-resolution:
  PSNR, SSIM and RMSE in a HU window per case, a baseline row for the degraded input, and a panel
  picture per case (:func:`~autoseg.evaluation.restoration.run`).
* :mod:`~autoseg.evaluation.postprocess` — keep-largest-component decisions and their application.
* :mod:`~autoseg.evaluation.find_best` — ``autoseg find-best``: configurations and ensembles
  compared on the cross-validation predictions -> ``best.yaml``.
* :mod:`~autoseg.evaluation.ensemble` — ``autoseg ensemble``: saved probabilities averaged.

Fold validation after training, which runs the predictor, is :mod:`autoseg.training.validation`:
this package sits below :mod:`autoseg.inference` (the predictor applies best.yaml's
postprocessing from here), so it cannot call the predictor itself.
"""

"""Imported at start-up by a job process whose PYTHONPATH names this folder (tests/e2e/test_recipe.py, the
`graphed` plan): the CPU cannot capture CUDA graphs, so the plan is made to choose them wherever a GPU would (`fast`,
one process, no checkpointing, packing or compile) and job/graphs.py's StepGraphs computes each padded micro-batch
through its buffers without capturing (capture=False): the computation a GPU captures and replays, run end to end."""

import job.graphs
import job.speed


def _cuda_graphs(cfg, placement, attention, processes, checkpointing, tokens):
    return cfg.profile == "fast" and processes == 1 and not (checkpointing or cfg.packing or cfg.compile)


_init = job.graphs.StepGraphs.__init__


def _without_capture(self, params, device, loss_fn=None, capture=True):
    _init(self, params, device, loss_fn, capture=False)


job.speed._cuda_graphs = _cuda_graphs
job.graphs.StepGraphs.__init__ = _without_capture

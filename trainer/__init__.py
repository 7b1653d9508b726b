"""jaxjob trainer: one data-parallel JAX training loop from a laptop CPU to a TPU pod.

The public entry points (imported lazily: `import trainer` stays cheap, so
`python -m trainer` can install its SIGTERM handler before JAX loads):

    trainer.train_and_evaluate(config, workdir, model=..., dataset=..., task=..., hooks=...)
    job = trainer.build(config, model=..., dataset=..., task=..., hooks=...)
    trainer.run(job, workdir)

See docs/your-own-model.md.
"""


def train_and_evaluate(config, workdir=None, allow_config_change=False, **objects):
  """`train.train_and_evaluate`: build and run a job; returns summary.json's dict."""
  from trainer import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, workdir, allow_config_change, **objects)


def build(config, **objects):
  """`train.build`: data, task, model, optimiser, state and compiled step of a config."""
  from trainer import train  # pylint: disable=g-import-not-at-top
  return train.build(config, **objects)


def run(job, workdir=None, allow_config_change=False):
  """`train.run`: run a built job in `workdir`, resuming its newest checkpoint."""
  from trainer import train  # pylint: disable=g-import-not-at-top
  return train.run(job, workdir, allow_config_change)

"""Tiny train configs for tests: the embedded model on a small phantom pool, no sample grids."""
from medjax import batches
from medjax import train_config
from medjax import trainer
from medjax.data import make_dataset


def tiny_config(objective: str = "unet", **overrides):
  c = train_config.base_config()
  c.objective = objective
  c.total_steps = 3
  c.batch_size = 2
  c.checkpoint_every_steps = 1
  c.log_every_steps = 1
  c.progress_bar = False
  c.sample.num_per_prompt = 0
  c.sample.num_inference_steps = 2
  c.data.phantoms.num = 24
  c.data.classes = (("pleural_effusion", {"Pleural Effusion": 1}),
                   ("no_finding", {"No Finding": 1}))
  if objective == "textual_inversion":
    c.textual_inversion.tokens = (("<effusion>", "pleural effusion"),
                                  ("<healthy-cxr>", "normal chest"))
    c.textual_inversion.num_vectors = 4
    c.data.prompt.kind = "class"
    c.data.prompt.class_prompts = {"pleural_effusion": "a chest x-ray with <effusion>",
                                   "no_finding": "a chest x-ray with <healthy-cxr>"}
    c.learning_rate = 5e-3
  return set_dotted(c, overrides)


def set_dotted(config, changes: dict):
  """`config` with {'a.b': value} set in place (as `--config.a.b=value` would); returns it."""
  for key, value in changes.items():
    node = config
    *path, last = key.split(".")
    for name in path:
      node = node[name]
    node[last] = value
  return config


def run_steps(config, n, mesh=None):
  """`n` train steps in-process (no checkpoints): (Setup, state, losses)."""
  run = trainer.setup(config, mesh=mesh)
  data = make_dataset(config.data, "train", config.batch_size, seed=config.seed,
                      resolution=config.resolution)
  state, losses = run.state, []
  for i in range(n):
    batch = batches.host_batch(run, next(data), step=i, cache=None, prior=None)
    state, metrics = run.step(state, run.frozen, batch)
    losses.append(float(metrics["loss"]))
  return run, state, losses

"""InceptionV3 and its converter against the real pytorch-fid 0.3 (random weights, no download).

pytorch-fid's `fid_inception_v3()` downloads its weights; here `load_state_dict_from_url` is
patched to hand it a state dict of the same architecture, every tensor (BatchNorm running
statistics included) is then randomised with a seed, and the weights travel through a real
`.pth` (torch.save) and `.safetensors` file into `medjax.eval.inception_weights`. The Inception
network is compiled once for this module: every feature call below uses the same batch shape.
"""
import jax
import numpy as np
import pytest
import pytorch_fid.inception as pfi
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid.fid_score import calculate_frechet_distance

from medjax.convert.weights import write_safetensors
from medjax.errors import MedjaxError
from medjax.eval import fid
from medjax.eval import inception_weights as iw
from medjax.eval.inception import resize_bilinear
from medjax.sharding import make_mesh

torch.set_num_threads(2)

# Max abs error of the 2048-d features vs pytorch-fid (features ~1.8 mean |x|, ~20 max).
# Measured 1.5e-5 on 2 CPU cores.
FEATURES_TOL = 1e-4
# FID between the two 4-image sets, relative to pytorch-fid's own pipeline.
FID_REL_TOL = 1e-3
# Bilinear resize vs F.interpolate (float32), max abs on values in [0, 1]; measured 1.2e-7
# (1 ulp: same weights bit for bit, FMA contraction may differ).
RESIZE_TOL = 1e-6

N_IMAGES, HEIGHT, WIDTH = 4, 40, 56  # upsampled to 299 inside the network


def _torchvision_state_dict(*args, **kwargs):
  """What `load_state_dict_from_url` would return, structurally: no download."""
  del args, kwargs
  return torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                         init_weights=False).state_dict()


def random_fid_inception(seed: int) -> torch.nn.Module:
  """pytorch-fid's `fid_inception_v3()` with seeded random weights and BatchNorm statistics.

  He-scaled convs and BatchNorm near identity keep activations O(1) through the 94 layers, so
  an absolute tolerance on the features means something.
  """
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pfi, "load_state_dict_from_url", _torchvision_state_dict)
    model = pfi.fid_inception_v3()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 4:
        p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
      elif name.endswith("bn.weight"):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=gen))
  return model.eval()


def pytorch_fid_model(state_dict) -> torch.nn.Module:
  """`InceptionV3([3], use_fid_inception=True)` (the FID model) built on `state_dict`."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state_dict)
    return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                           use_fid_inception=True).eval()


def torch_features(model, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  folder = tmp_path_factory.mktemp("inception")
  state_dict = random_fid_inception(seed=0).state_dict()
  pth = folder / iw.WEIGHTS_FILE
  torch.save(state_dict, pth)
  safetensors = folder / "inception.safetensors"
  write_safetensors({k: v.numpy() for k, v in state_dict.items()}, safetensors)
  model = pytorch_fid_model(state_dict)
  rng = np.random.default_rng(1)
  # Set a: 8-bit RGB values (so uint8 input can be checked against it); set b: gray in RGB.
  images_a = rng.integers(0, 256, (N_IMAGES, HEIGHT, WIDTH, 3)).astype(np.float32) / np.float32(255)
  images_b = np.repeat(rng.beta(2, 5, (N_IMAGES, HEIGHT, WIDTH, 1)).astype(np.float32), 3, -1)
  variables = iw.load_inception(pth, allow_pickle=True)
  return {
      "state_dict": state_dict, "pth": pth, "safetensors": safetensors, "model": model,
      "variables": variables, "images_a": images_a, "images_b": images_b,
      "torch_a": torch_features(model, images_a), "torch_b": torch_features(model, images_b),
      "ours_a": fid.inception_features(variables, images_a),
      "ours_b": fid.inception_features(variables, images_b)}


def test_features_match_pytorch_fid(ref):
  for ours, theirs in ((ref["ours_a"], ref["torch_a"]), (ref["ours_b"], ref["torch_b"])):
    assert ours.shape == (N_IMAGES, 2048) and ours.dtype == np.float32
    assert np.abs(theirs).mean() > 0.5  # activations neither vanished nor saturated
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=FEATURES_TOL)


def _pytorch_fid(features_a, features_b):
  """pytorch-fid's own statistics (calculate_activation_statistics) and distance."""
  stats = [(np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in (features_a, features_b)]
  return stats, calculate_frechet_distance(*stats[0], *stats[1])


def test_fid_matches_pytorch_fid_on_64_dims(ref):
  """The FID formula on the first 64 feature dims: scipy's sqrtm of 2048x2048 is the slow test."""
  dims = slice(0, 64)
  stats, theirs = _pytorch_fid(ref["torch_a"][:, dims], ref["torch_b"][:, dims])
  # Same statistics, our Fréchet distance: only float64 rounding apart.
  np.testing.assert_allclose(fid.frechet_distance(*stats[0], *stats[1]), theirs, rtol=1e-9)
  ours = fid.frechet_distance(*fid.statistics(ref["ours_a"][:, dims]),
                              *fid.statistics(ref["ours_b"][:, dims]))
  np.testing.assert_allclose(ours, theirs, rtol=FID_REL_TOL)


@pytest.mark.slow(reason="scipy sqrtm of a singular 2048x2048 product: 1-3 min a call on 2 cores")
def test_fid_matches_pytorch_fid(ref):
  stats, theirs = _pytorch_fid(ref["torch_a"], ref["torch_b"])
  np.testing.assert_allclose(fid.frechet_distance(*stats[0], *stats[1]), theirs, rtol=1e-9)
  ours = fid.compute_fid(ref["images_a"], ref["images_b"], params=ref["variables"])
  np.testing.assert_allclose(ours, theirs, rtol=FID_REL_TOL)


def test_one_compile_per_batch_shape_and_padding(ref):
  """6 images in batches of 4: the padded last batch reuses the fixture's compiled network."""
  before = fid._forward._cache_size()  # pylint: disable=protected-access
  images = np.concatenate([ref["images_a"], ref["images_b"][:2]])
  features = fid.inception_features(ref["variables"], images, batch_size=4)
  assert fid._forward._cache_size() == before  # pylint: disable=protected-access
  expected = np.concatenate([ref["ours_a"], ref["ours_b"][:2]])
  np.testing.assert_allclose(features, expected, rtol=0, atol=1e-5)


def test_grayscale_is_repeated_to_rgb(ref):
  features = fid.inception_features(ref["variables"], ref["images_b"][..., :1])
  np.testing.assert_array_equal(features, ref["ours_b"])


def test_uint8_and_list_inputs(ref):
  """uint8 is divided by 255 (ToTensor); a list of HWC arrays is the same as one array."""
  as_uint8 = np.round(ref["images_a"] * 255).astype(np.uint8)
  features = fid.inception_features(ref["variables"], list(as_uint8))
  np.testing.assert_array_equal(features, ref["ours_a"])


@pytest.mark.slow(reason="sharded inputs compile the network a second time (~6-11 s)")
def test_mesh_data_parallel(ref):
  features = fid.inception_features(ref["variables"], ref["images_a"], mesh=make_mesh(data=-1))
  np.testing.assert_allclose(features, ref["ours_a"], rtol=0, atol=1e-5)


def test_safetensors_and_wrapper_state_dict_convert_the_same(ref):
  from_safetensors = iw.load_inception(ref["safetensors"])
  wrapper = iw.state_dict_to_variables(ref["model"].state_dict(), source="wrapper")
  for other in (from_safetensors, wrapper):
    for (path, a), (_, b) in zip(_flat(ref["variables"]), _flat(other), strict=True):
      np.testing.assert_array_equal(a, b, err_msg=path)
  roundtrip = iw.variables_to_state_dict(ref["variables"])
  for key, value in roundtrip.items():
    np.testing.assert_array_equal(value, ref["state_dict"][key].numpy(), err_msg=key)


def _flat(tree):
  return [(jax.tree_util.keystr(p), np.asarray(v))
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_cli_writes_a_pickle_free_copy(ref, tmp_path):
  out = tmp_path / "inception.safetensors"
  assert iw.main([str(ref["pth"]), str(out)]) == 0
  for (path, a), (_, b) in zip(_flat(ref["variables"]), _flat(iw.load_inception(out)),
                               strict=True):
    np.testing.assert_array_equal(a, b, err_msg=path)
  assert iw.main([str(tmp_path / "missing.pth"), str(out)]) == 1


def test_pth_needs_allow_pickle(ref):
  with pytest.raises(MedjaxError, match="allow_pickle=True"):
    iw.load_inception(ref["pth"])


def test_weights_found_via_env_var_and_torch_home(ref, tmp_path, monkeypatch):
  monkeypatch.setenv(iw.ENV_VAR, str(ref["safetensors"]))
  assert iw.find_weights() == ref["safetensors"]
  iw.load_inception()  # safetensors: no pickle opt-in needed
  monkeypatch.delenv(iw.ENV_VAR)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path))
  hub = tmp_path / "hub" / "checkpoints" / iw.WEIGHTS_FILE
  hub.parent.mkdir(parents=True)
  hub.write_bytes(ref["pth"].read_bytes())
  assert iw.find_weights() == hub
  iw.load_inception(allow_pickle=True)


def test_missing_weights_message(tmp_path, monkeypatch):
  monkeypatch.delenv(iw.ENV_VAR, raising=False)
  monkeypatch.setenv("TORCH_HOME", str(tmp_path))
  with pytest.raises(MedjaxError) as e:
    iw.load_inception()
  message = str(e.value)
  assert iw.WEIGHTS_FILE in message and iw.WEIGHTS_URL in message
  assert str(tmp_path / "hub" / "checkpoints" / iw.WEIGHTS_FILE) in message
  assert iw.ENV_VAR in message and "\n" not in message
  monkeypatch.setenv(iw.ENV_VAR, str(tmp_path / "nowhere.pth"))
  with pytest.raises(MedjaxError, match=f"{iw.ENV_VAR}=.*nowhere.pth: file not found"):
    iw.load_inception()
  with pytest.raises(MedjaxError, match="Inception weights not found|file not found"):
    fid.compute_fid(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)))


def test_converter_reports_every_problem(ref):
  sd = {k: v.numpy() for k, v in ref["state_dict"].items()}
  del sd["Mixed_6b.branch7x7_2.conv.weight"]
  sd["Mixed_9z.conv.weight"] = np.zeros((1,), np.float32)
  sd["Mixed_7c.branch_pool.bn.running_var"] = np.ones((191,), np.float32)
  with pytest.raises(MedjaxError) as e:
    iw.state_dict_to_variables(sd, source="bad.pth")
  message = str(e.value)
  assert message.startswith("bad.pth:")
  for part in ("missing 1", "Mixed_6b.branch7x7_2.conv.weight", "unexpected 1", "Mixed_9z",
               "wrong shape 1", "Mixed_7c.branch_pool.bn.running_var: (191,)"):
    assert part in message, (part, message)


@pytest.mark.parametrize("in_size,out_size", [
    ((40, 56), (299, 299)),    # up, non-square
    ((17, 5), (299, 299)),     # strong up
    ((640, 480), (299, 299)),  # down, no antialias
    ((300, 1024), (299, 299)),
    ((299, 299), (299, 299)),  # identity
    ((7, 9), (3, 20)),         # down on one axis, up on the other
])
def test_resize_matches_torch_interpolate(in_size, out_size):
  x = np.random.default_rng(2).random((2, *in_size, 3), dtype=np.float32)
  theirs = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_size,
                         mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(resize_bilinear(x, out_size))
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=RESIZE_TOL)


def test_random_inception_is_seeded():
  a, b = iw.random_inception(0), iw.random_inception(0)
  for (path, x), (_, y) in zip(_flat(a), _flat(b), strict=True):
    np.testing.assert_array_equal(x, y, err_msg=path)
  assert set(a) == {"params", "batch_stats"}
  iw.state_dict_to_variables(iw.variables_to_state_dict(a))  # same names and shapes

"""Image helpers: grids of generated images."""
import numpy as np

from medjax import images


def test_grid_layout():
  imgs = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
  g = images.grid(imgs)
  assert g.shape == (4, 6, 3)
  np.testing.assert_array_equal(g[2:, 2:4], imgs[4])
  assert not g[2:, 4:].any()

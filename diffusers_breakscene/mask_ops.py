"""Small numpy operations on bool masks: connected regions, erosion and dilation.

Hand-written because no dependency of this package labels regions (scipy and scikit-image are
not dependencies); the masks they see are small (at most a few hundred pixels on a side).

Example:
    >>> import numpy as np
    >>> m = np.zeros((5, 5), bool); m[0, 0] = m[1, 1] = True
    >>> len(regions(m, connectivity=4)), len(regions(m, connectivity=8))
    (2, 1)
"""

from __future__ import annotations

import numpy as np

__all__ = ["dilate", "erode", "regions"]


def regions(mask: np.ndarray, connectivity: int = 4) -> list[np.ndarray]:
    """The connected regions of a bool mask (``connectivity`` 4 or 8), each a bool mask, in
    the order of their first pixel (row by row)."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}.")
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        region = np.zeros_like(mask)
        stack = [(int(y0), int(x0))]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region[y, x] = True
            for dy, dx in steps:
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(region)
    return out


def erode(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` whose four neighbours inside the image are in it too."""
    out = np.array(mask, dtype=bool)
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel: its pixels and their four neighbours (the inverse of
    :func:`erode`).

    Example:
        >>> m = np.zeros((3, 3), bool); m[1, 1] = True
        >>> int(dilate(m).sum()), bool(np.array_equal(erode(dilate(m)), m))
        (5, True)
    """
    mask = np.asarray(mask, dtype=bool)
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out

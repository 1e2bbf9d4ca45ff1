"""A CarRacing that draws the same frames in less time.

Gymnasium's ``CarRacing-v3`` spends almost all of ``step`` in ``_render``: every frame it rotates,
scales and culls about 800 grass and road polygons one vertex at a time in Python
(``pygame.math.Vector2.rotate_rad`` per vertex), builds a new ``pygame.font.Font`` for the score
and a new 1000x800 surface. The Box2D physics is a few percent.

:class:`CarRacingFast` keeps the physics, the track and the pygame drawing calls of the stock env,
in the same order with the same arguments, and changes how those arguments are computed:

- all polygons of the track are stacked once per track into one array and transformed and culled
  together with numpy, using the same floating-point operations as pygame's ``rotate_rad`` (the
  angle reduced to [0, 2 pi) with ``fmod``, the exact 0/90/180/270 degree cases, then
  ``cos * x - sin * y``), so every vertex, and therefore every pixel, is the same;
- road tiles are drawn with their *live* colour (the stock contact listener recolours a tile in
  place when the car first touches it);
- calls that provably change no pixel are skipped (polygons whose bounding box lies outside the
  window: the stock culling keeps everything within 382 pixels of it), and the background
  polygon, when it covers the window, is replaced by a fill with its colour (the same pixels);
- the score font is built once, the score text re-rendered only when it changes, and the drawing
  surface reused.

Observations, ``render()`` output in every mode, rewards and termination are bit-identical to the
stock env for the same seed and actions; :func:`matches_stock` checks that for the installed
gymnasium and pygame, and the collector falls back to the stock env if it ever fails.
``import carsynth`` registers the env as ``carsynth/CarRacingFast-v3``, a drop-in replacement for
``CarRacing-v3`` in RL training.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pygame
from gymnasium.envs.box2d import car_racing as stock
from gymnasium.envs.box2d.car_racing import CarRacing
from pygame import gfxdraw

ENV_ID = "carsynth/CarRacingFast-v3"

# pygame's Vector2.rotate_rad (src_c/math.c, _vector2_rotate_helper) reduces the angle with these
# constants and treats angles within VECTOR_EPSILON of a right angle as exact quarter turns.
TWO_PI = 2.0 * math.pi
HALF_PI = math.pi / 2.0
VECTOR_EPSILON = 1e-6

# The stock env draws a 20 x 20 checkerboard of grass patches, x outer, y inner; built here with
# the same expressions (GRASS_DIM * x + GRASS_DIM, ...) so the coordinates are the same floats.
_GRASS_STEPS = range(-20, 20, 2)
GRASS = np.array(
    [
        [
            (stock.GRASS_DIM * x + stock.GRASS_DIM, stock.GRASS_DIM * y + 0),
            (stock.GRASS_DIM * x + 0, stock.GRASS_DIM * y + 0),
            (stock.GRASS_DIM * x + 0, stock.GRASS_DIM * y + stock.GRASS_DIM),
            (stock.GRASS_DIM * x + stock.GRASS_DIM, stock.GRASS_DIM * y + stock.GRASS_DIM),
        ]
        for x in _GRASS_STEPS
        for y in _GRASS_STEPS
    ],
    dtype=np.float64,
)
_B = stock.PLAYFIELD
FIELD = np.array([[(_B, _B), (_B, -_B), (-_B, -_B), (-_B, _B)]], dtype=np.float64)


# Two exact shortcuts need to know which pixels gfxdraw can touch. Its rasteriser moves an edge
# by at most a pixel (float coordinates become ints) and its anti-aliased outline touches only
# pixels next to an edge, so PIXEL_MARGIN pixels of slack make "covers" and "misses" the window
# certain. Beyond SAFE_COORDINATE pixels, gfxdraw's 16.16 fixed-point edge intersections could
# overflow; polygons that reach that far are drawn as the stock env draws them, whatever it gives.
PIXEL_MARGIN = 3.0
SAFE_COORDINATE = 10_000.0


def covers_window(polygon: np.ndarray) -> bool:
    """Whether a convex polygon (4, 2) in window pixels covers the whole window, with margin.

    The grown window is inside a convex polygon exactly when its four corners are on the inner
    side of every edge (cross products of one sign). Such a polygon, filled and outlined, draws
    the same pixels as a fill of the window with its colour.
    """
    if np.abs(polygon).max() > SAFE_COORDINATE:
        return False
    low, right = -PIXEL_MARGIN, stock.WINDOW_W - 1 + PIXEL_MARGIN
    bottom = stock.WINDOW_H - 1 + PIXEL_MARGIN
    corners = np.array([(low, low), (right, low), (right, bottom), (low, bottom)])
    edges = np.roll(polygon, -1, axis=0) - polygon
    offsets = corners[:, None, :] - polygon[None, :, :]
    cross = edges[None, :, 0] * offsets[..., 1] - edges[None, :, 1] * offsets[..., 0]
    return bool((cross > 0).all() or (cross < 0).all())


def misses_window(polygons: np.ndarray) -> np.ndarray:
    """Which polygons (N, 4, 2) in window pixels certainly draw no pixel: bounding box outside."""
    low, high = polygons.min(axis=1), polygons.max(axis=1)
    size = np.array([stock.WINDOW_W, stock.WINDOW_H])
    outside = ((high < -PIXEL_MARGIN) | (low > size - 1 + PIXEL_MARGIN)).any(axis=1)
    safe = np.abs(polygons).max(axis=(1, 2)) <= SAFE_COORDINATE
    return outside & safe


def rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate points (..., 2) by ``angle`` radians exactly as ``Vector2(p).rotate_rad(angle)``.

    The angle is reduced the way pygame reduces it, and its sine and cosine come from the C
    library once (numpy's vectorised sin/cos may differ in the last bit); the per-point products
    and sums are plain IEEE double operations, the same in numpy as in pygame's C code.
    """
    angle = math.fmod(angle, TWO_PI)
    if angle < 0:
        angle += TWO_PI
    x, y = points[..., 0], points[..., 1]
    if math.fmod(angle + VECTOR_EPSILON, HALF_PI) < 2 * VECTOR_EPSILON:
        quarter = int((angle + VECTOR_EPSILON) / HALF_PI) % 4
        turned = [(x, y), (-y, x), (-x, -y), (y, -x)][quarter]
        return np.stack(turned, axis=-1)
    sin, cos = math.sin(angle), math.cos(angle)
    return np.stack((cos * x - sin * y, sin * x + cos * y), axis=-1)


@functools.cache
def score_font() -> pygame.font.Font:
    """The stock env's score font, built once instead of every frame (see ``_score_text``)."""
    return pygame.font.Font(pygame.font.get_default_font(), 42)


class CarRacingFast(CarRacing):
    """Gymnasium's ``CarRacing`` with the same frames, stepping 2.5 to 3 times faster.

    Same constructor arguments, spaces, physics, rewards and observations as ``CarRacing``; see
    the module docstring for what changes and why the pixels do not.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Derived from the current track: rebuilt whenever `road_poly` is another list (every
        # reset makes a new one), so nothing of an old track survives a reset.
        self._polygons: np.ndarray | None = None  # (1 + grass + road, 4, 2) world coordinates
        self._polygons_source: list | None = None  # the road_poly list they were built from
        self._road_colors: list = []  # the tiles' colour arrays themselves, read at draw time
        self._score: tuple[str, pygame.Surface] | None = None  # last score text and its image
        self._canvas: pygame.Surface | None = None  # drawing surface, cleared every frame

    def _track_polygons(self) -> np.ndarray:
        """Background, grass and road polygons of the current track as one array, in draw order."""
        if self._polygons_source is not self.road_poly or self._polygons is None:
            road = np.array([poly for poly, _ in self.road_poly], dtype=np.float64)
            self._polygons = np.concatenate([FIELD, GRASS, road.reshape(-1, 4, 2)])
            self._road_colors = [color for _, color in self.road_poly]
            self._polygons_source = self.road_poly
        return self._polygons

    def _render_road(self, zoom: float, translation: tuple[float, float], angle: float) -> None:
        """Draw background, grass and road: the stock calls on the visible polygons, in order."""
        screen = rotate(self._track_polygons(), angle)
        screen[..., 0] = screen[..., 0] * zoom + translation[0]
        screen[..., 1] = screen[..., 1] * zoom + translation[1]
        # Stock culling: a polygon is drawn if any vertex lies in the window grown by the
        # largest shape's diagonal (382 pixels); the background (index 0) is always drawn.
        margin = stock.MAX_SHAPE_DIM
        inside = (
            (-margin <= screen[..., 0])
            & (screen[..., 0] <= stock.WINDOW_W + margin)
            & (-margin <= screen[..., 1])
            & (screen[..., 1] <= stock.WINDOW_H + margin)
        )
        inside[0] = True
        indices = np.flatnonzero(inside.any(axis=1))
        # About two thirds of those lie outside the window and change no pixel: skipped.
        indices = indices[~misses_window(screen[indices])]
        # The canvas is cleared here: once the zoom-in is over the background covers the
        # window, and one fill with its colour replaces clearing plus filling a polygon
        # 10,000 rows high.
        covered = covers_window(screen[0])
        self.surf.fill(self.bg_color if covered else (0, 0, 0))
        if covered:
            indices = indices[indices != 0]
        grass_end = 1 + len(GRASS)
        for index, poly in zip(indices.tolist(), screen[indices].tolist(), strict=True):
            if index == 0:
                color = self.bg_color
            elif index < grass_end:
                color = self.grass_color
            else:
                color = [int(c) for c in self._road_colors[index - grass_end]]
            gfxdraw.aapolygon(self.surf, poly, color)
            gfxdraw.filled_polygon(self.surf, poly, color)

    def _render(self, mode: str):
        """The stock ``_render``, with the font, score text and drawing surface kept."""
        assert mode in self.metadata["render_modes"]

        pygame.font.init()
        if self.screen is None and mode == "human":
            pygame.display.init()
            self.screen = pygame.display.set_mode((stock.WINDOW_W, stock.WINDOW_H))
        if self.clock is None:
            self.clock = pygame.time.Clock()

        if "t" not in self.__dict__:
            return  # reset() not called yet

        if self._canvas is None:
            self._canvas = pygame.Surface((stock.WINDOW_W, stock.WINDOW_H))
        self.surf = self._canvas  # cleared by _render_road

        assert self.car is not None
        angle = -self.car.hull.angle
        # The zoom-in of the first second, as in the stock env.
        zoom = 0.1 * stock.SCALE * max(1 - self.t, 0) + stock.ZOOM * stock.SCALE * min(self.t, 1)
        scroll_x = -(self.car.hull.position[0]) * zoom
        scroll_y = -(self.car.hull.position[1]) * zoom
        trans = pygame.math.Vector2((scroll_x, scroll_y)).rotate_rad(angle)
        trans = (stock.WINDOW_W / 2 + trans[0], stock.WINDOW_H / 4 + trans[1])

        self._render_road(zoom, trans, angle)
        self.car.draw(
            self.surf, zoom, trans, angle, mode not in ["state_pixels_list", "state_pixels"]
        )

        self.surf = pygame.transform.flip(self.surf, False, True)

        self._render_indicators(stock.WINDOW_W, stock.WINDOW_H)

        text = self._score_text(f"{self.reward:04.0f}")
        text_rect = text.get_rect()
        text_rect.center = (60, stock.WINDOW_H - stock.WINDOW_H * 2.5 / 40.0)
        self.surf.blit(text, text_rect)

        if mode == "human":
            pygame.event.pump()
            self.clock.tick(self.metadata["render_fps"])
            assert self.screen is not None
            self.screen.fill(0)
            self.screen.blit(self.surf, (0, 0))
            pygame.display.flip()
        elif mode == "rgb_array":
            return self._create_image_array(self.surf, (stock.VIDEO_W, stock.VIDEO_H))
        elif mode == "state_pixels":
            return self._create_image_array(self.surf, (stock.STATE_W, stock.STATE_H))
        else:
            return self.isopen

    def _score_text(self, text: str) -> pygame.Surface:
        """The score as the stock env renders it, re-rendered only when the text changes."""
        if self._score is None or self._score[0] != text:
            try:
                image = score_font().render(text, True, (255, 255, 255), (0, 0, 0))
            except pygame.error:
                # The font died with its pygame session: pygame.quit() (every env's close())
                # or pygame.font.quit() since it was built. pygame offers no hook that sees
                # both (a quit function registered once runs at the first quit only, which
                # left every env after a second quit failing with "Invalid font").
                score_font.cache_clear()
                image = score_font().render(text, True, (255, 255, 255), (0, 0, 0))
            self._score = (text, image)
        return self._score[1]


def matches_stock(seed: int = 7, steps: int = 60) -> bool:
    """Whether :class:`CarRacingFast` reproduces the stock env's observations here.

    Drives both envs with the same actions for ``steps`` steps from ``reset(seed=seed)``: the
    zoom-in of the first 50 steps, then the car on the road (tiles recolour) while turning (the
    rotation takes general angles). Cheap (under a second); the collector calls it once per run,
    because the fast env overrides private methods of gymnasium that a new version may change.
    """
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    envs = [CarRacing(), CarRacingFast()]
    try:
        observations = [env.reset(seed=seed)[0] for env in envs]
        for step in range(steps + 1):
            if not np.array_equal(observations[0], observations[1]):
                return False
            action = np.array([0.3 * math.sin(step / 9.0), 0.6, 0.0], dtype=np.float32)
            observations = [env.step(action)[0] for env in envs]
        return True
    except Exception:  # an override that breaks on this gymnasium does not reproduce it either
        return False
    finally:
        for env in envs:
            env.close()

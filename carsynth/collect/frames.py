"""From an environment to stored frames: make the env, turn an observation into a frame.

A CarRacing observation is 96x96 RGB; its bottom 12 rows are the dashboard (speed, ABS, steering
and gyro bars). ``--crop-hud`` removes them before the resize. The resize is anti-aliased
(Pillow's bilinear filter widens its support when it shrinks, so every source pixel counts), the
way World Models prepared its 64x64 CarRacing frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from PIL import Image

# CarRacing draws its indicator panel over the bottom H * 5/40 rows of the 96-pixel observation.
HUD_ROWS = 12
# Road tiles are grey (~100-110 in every channel), grass green; these bounds separate them
# after the resize too.
ROAD_MAX_SATURATION = 25
ROAD_VALUE_RANGE = (60, 170)


@dataclass(frozen=True)
class EnvSettings:
    """Everything that decides which env is built and how it behaves."""

    env_id: str = "CarRacing-v3"
    domain_randomize: bool = False
    lap_complete_percent: float = 0.95
    max_steps: int = 1000
    renderer: str = "fast"  # "fast" (carsynth.envs.CarRacingFast, same frames) or "stock"

    def make(self) -> gym.Env:
        """Build the env headless (SDL's dummy video driver: pygame never opens a window)."""
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        kwargs: dict = {}
        if self.is_car_racing:
            kwargs = {
                "domain_randomize": self.domain_randomize,
                "lap_complete_percent": self.lap_complete_percent,
            }
        try:
            return gym.make(self.resolved_id, max_episode_steps=self.max_steps, **kwargs)
        except gym.error.Error as error:
            raise ValueError(f"cannot make env {self.env_id!r}: {error}") from None

    @property
    def is_car_racing(self) -> bool:
        return self.env_id in ("CarRacing-v3", "carsynth/CarRacingFast-v3")

    @property
    def resolved_id(self) -> str:
        """The gymnasium id actually made: the fast renderer replaces CarRacing-v3."""
        if self.env_id == "CarRacing-v3" and self.renderer == "fast":
            return "carsynth/CarRacingFast-v3"  # registered by `import carsynth`
        return self.env_id


@dataclass(frozen=True)
class FrameSettings:
    """How observations become stored frames."""

    size: int = 64
    crop_hud: bool = False
    skip_frames: int = 50
    frame_skip: int = 1


def process_frame(observation: np.ndarray, size: int, crop_hud: bool) -> np.ndarray:
    """An observation (H, W, 3) uint8 as a stored frame (size, size, 3) uint8."""
    if crop_hud:
        observation = observation[:-HUD_ROWS]
    if observation.shape[:2] == (size, size):
        return np.ascontiguousarray(observation, dtype=np.uint8)
    image = Image.fromarray(observation).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


class RecordedFrames(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """An env that gives the observations carsynth records: the frame processing as a wrapper.

    ``reset`` drives the first ``skip_frames`` env steps (the zoom-in) with a zero action and
    returns the frame after them; ``step`` repeats the action ``frame_skip`` times (stopping at
    the end of the episode) and returns the summed reward. Observations are
    :func:`process_frame`'s ``size`` x ``size`` uint8 frames (HUD cropped with ``crop_hud``).
    This is the env a converted Minari dataset recovers (``carsynth convert --to minari``). The
    collector lets its policy drive the zoom-in instead of the zero action, so the first frame of
    a recorded episode may show the car a little further on than this wrapper's first frame.
    """

    def __init__(
        self,
        env: gym.Env,
        size: int = 64,
        crop_hud: bool = False,
        skip_frames: int = 50,
        frame_skip: int = 1,
    ) -> None:
        # Recorded so that env.spec (and a Minari dataset's spec) can rebuild this wrapper.
        gym.utils.RecordConstructorArgs.__init__(
            self, size=size, crop_hud=crop_hud, skip_frames=skip_frames, frame_skip=frame_skip
        )
        gym.Wrapper.__init__(self, env)
        self.settings = FrameSettings(size, crop_hud, skip_frames, frame_skip)
        self.observation_space = gym.spaces.Box(0, 255, (size, size, 3), dtype=np.uint8)

    def _frame(self, observation: np.ndarray) -> np.ndarray:
        return process_frame(observation, self.settings.size, self.settings.crop_hud)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        observation, info = self.env.reset(seed=seed, options=options)
        idle = np.zeros(self.action_space.shape, dtype=self.action_space.dtype)
        steps = 0
        while steps < self.settings.skip_frames:
            observation, _, terminated, truncated, info = self._repeat(idle)
            steps += self.settings.frame_skip
            if terminated or truncated:
                break
        return self._frame(observation), info

    def _repeat(self, action):
        """One recorded step on the unprocessed env: the action repeated ``frame_skip`` times."""
        reward, terminated, truncated = 0.0, False, False
        for _ in range(self.settings.frame_skip):
            observation, r, terminated, truncated, info = self.env.step(action)
            reward += float(r)
            if terminated or truncated:
                break
        return observation, reward, terminated, truncated, info

    def step(self, action):
        observation, reward, terminated, truncated, info = self._repeat(action)
        return self._frame(observation), reward, terminated, truncated, info


def is_road(pixels: np.ndarray) -> np.ndarray:
    """Which pixels are road: grey (low saturation) and neither black nor white."""
    pixels = pixels.astype(np.int16)
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    value = pixels.max(axis=-1)
    low, high = ROAD_VALUE_RANGE
    return (saturation <= ROAD_MAX_SATURATION) & (value >= low) & (value <= high)


def road_fraction_near_car(frames: np.ndarray, crop_hud: bool = False) -> np.ndarray:
    """For each frame, the share of road pixels in a small box around the car.

    The camera follows the car, which sits horizontally centred, its centre about 70 rows down
    the 96-row observation (CarRacing's camera looks ahead of the car). The box spans the car and
    a car-length around it, scaled to the stored frame size.
    """
    height = frames.shape[1]
    full = 96 - (HUD_ROWS if crop_hud else 0)
    scale = height / full
    top, bottom, left, right = (int(round(v * scale)) for v in (60, 80, 40, 56))
    box = frames[:, top:bottom, left:right]
    return is_road(box).mean(axis=(1, 2))

"""Rollout policies: who holds the steering wheel while frames are recorded.

Every policy has the same two methods: ``reset(env, rng)`` at the start of an episode (the rng is
the episode's own, so an episode depends on its seed alone) and ``act(env, observation)`` returning
an action for ``env.action_space``. Policies get the env itself so that a scripted one can read the
track geometry; learned ones can ignore it.

Parameters are dataclass fields, set from the command line with ``--policy-arg NAME=VALUE`` and
recorded in the file's attributes.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from carsynth.errors import UsageError


class Policy(Protocol):
    def reset(self, env: gym.Env, rng: np.random.Generator) -> None: ...

    def act(self, env: gym.Env, observation: np.ndarray) -> np.ndarray: ...


def _box(env: gym.Env) -> gym.spaces.Box:
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        raise UsageError(f"this policy needs continuous (Box) actions, the env has {space}")
    return space


@dataclass
class RandomPolicy:
    """Independent uniform samples from the action space at every step."""

    def reset(self, env: gym.Env, rng: np.random.Generator) -> None:
        self.rng = rng

    def act(self, env: gym.Env, observation: np.ndarray) -> np.ndarray:
        space = env.action_space
        if isinstance(space, gym.spaces.Discrete):
            return np.int64(space.start + self.rng.integers(space.n))
        box = _box(env)
        return self.rng.uniform(box.low, box.high).astype(box.dtype)


@dataclass
class BrownianPolicy:
    """Smoothed random actions: a random walk in action space, as World Models collected CarRacing.

    Each step adds Gaussian noise with standard deviation ``sigma * sqrt(dt)`` to the previous
    action and clips it to the action space (Ha & Schmidhuber 2018 used Brownian motion with
    dt = 1/30 for CarRacing).
    """

    sigma: float = 1.0
    dt: float = 1.0 / 30.0

    def reset(self, env: gym.Env, rng: np.random.Generator) -> None:
        box = _box(env)
        self.rng = rng
        self.action = rng.uniform(box.low, box.high)

    def act(self, env: gym.Env, observation: np.ndarray) -> np.ndarray:
        box = _box(env)
        step = self.rng.normal(0.0, self.sigma * math.sqrt(self.dt), size=box.shape)
        self.action = np.clip(self.action + step, box.low, box.high)
        return self.action.astype(box.dtype)


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


@dataclass
class PilotPolicy:
    """A scripted driver that follows CarRacing's track, with noise so that it does not drive alike.

    It steers toward a point ``lookahead`` track tiles ahead (more when fast), holds a target
    speed that drops before sharp bends, and adds Ornstein-Uhlenbeck noise to the steering. Now
    and then it starts an *excursion*: for a while it aims beside the road, drives over the curb
    onto the grass, and then recovers. Speed targets change per episode so that it accelerates,
    brakes and cruises at different speeds. The result is mostly road, with curves, curbs and
    some grass: the frames a world model needs.
    """

    lookahead: int = 3  # track tiles ahead to steer at, plus one per 15 units of speed
    steer_gain: float = 4.0  # steering per radian of heading error
    steer_damping: float = 0.5  # steering against the yaw rate (rad/s), so it does not weave
    speed_min: float = 30.0  # per-episode cruise speed is drawn from [speed_min, speed_max]
    speed_max: float = 60.0
    corner_slowdown: float = 40.0  # speed removed per radian of the sharpest bend ahead
    steer_noise: float = 0.15  # OU noise on the steering (stationary std)
    noise_theta: float = 0.15  # OU mean reversion per step
    excursion_rate: float = 0.004  # chance per step of starting an excursion
    excursion_steps: int = 40  # mean length of an excursion
    excursion_offset: float = 14.0  # how far beside the centre line it aims (track half-width ~6.7)

    def reset(self, env: gym.Env, rng: np.random.Generator) -> None:
        track = getattr(env.unwrapped, "track", None)
        if not track:
            raise UsageError("the pilot policy needs CarRacing (an env with a .track)")
        self.rng = rng
        self.points = np.array([(t[2], t[3]) for t in track])
        self.angles = np.array([t[1] for t in track])
        self.cruise = rng.uniform(self.speed_min, self.speed_max)
        self.noise = 0.0
        self.excursion_left = 0
        self.excursion_side = 0.0
        self.index = 0

    def _nearest(self, position: np.ndarray) -> int:
        # Search a window around the last index: the car moves a few tiles per step at most, and
        # a global search would jump to the other side of a hairpin.
        n = len(self.points)
        window = (self.index + np.arange(-10, 30)) % n
        distances = np.sum((self.points[window] - position) ** 2, axis=1)
        self.index = int(window[np.argmin(distances)])
        if distances.min() > 30.0**2:  # lost (far off the road): search the whole track
            self.index = int(np.argmin(np.sum((self.points - position) ** 2, axis=1)))
        return self.index

    def act(self, env: gym.Env, observation: np.ndarray) -> np.ndarray:
        car = env.unwrapped.car
        position = np.array(car.hull.position)
        velocity = np.array(car.hull.linearVelocity)
        speed = float(np.hypot(*velocity))
        n = len(self.points)
        i = self._nearest(position)
        ahead = (i + self.lookahead + int(speed / 15.0)) % n
        target = self.points[ahead]
        if self.excursion_left > 0:
            self.excursion_left -= 1
            normal = np.array([-math.sin(self.angles[ahead]), math.cos(self.angles[ahead])])
            target = target + self.excursion_side * self.excursion_offset * normal
        elif self.rng.random() < self.excursion_rate:
            self.excursion_left = int(self.rng.exponential(self.excursion_steps)) + 5
            self.excursion_side = float(self.rng.choice([-1.0, 1.0]))
        # Box2D's body y axis is the car's forward direction, so its heading is angle + pi/2.
        heading = car.hull.angle + math.pi / 2
        wanted = math.atan2(target[1] - position[1], target[0] - position[0])
        error = _wrap(wanted - heading)
        self.noise += (
            -self.noise_theta * self.noise
            + self.steer_noise * math.sqrt(2 * self.noise_theta) * self.rng.normal()
        )
        # CarRacing's action[0] = +1 steers right (clockwise), so a target to the left (error > 0)
        # needs a negative steering action.
        yaw_rate = car.hull.angularVelocity
        steer = -self.steer_gain * error + self.steer_damping * yaw_rate + self.noise
        steer = float(np.clip(steer, -1.0, 1.0))
        bend = max(abs(_wrap(self.angles[(i + k) % n] - self.angles[i])) for k in (6, 12, 18))
        target_speed = max(self.speed_min * 0.5, self.cruise - self.corner_slowdown * bend)
        # Facing away from the target (after a spin): creep while turning instead of orbiting it.
        if abs(error) > math.pi / 3:
            target_speed = min(target_speed, 12.0)
        gas = float(np.clip(0.1 * (target_speed - speed), 0.0, 1.0))
        brake = float(np.clip(0.05 * (speed - target_speed - 5.0), 0.0, 0.8))
        return np.array([steer, gas, brake], dtype=np.float32)


class CallablePolicy:
    """A user's function ``observation -> action``, named as ``module:function`` on the CLI."""

    def __init__(self, function: Any):
        self.function = function

    def reset(self, env: gym.Env, rng: np.random.Generator) -> None:
        pass

    def act(self, env: gym.Env, observation: np.ndarray) -> np.ndarray:
        return np.asarray(self.function(observation))


POLICIES: dict[str, type] = {
    "random": RandomPolicy,
    "brownian": BrownianPolicy,
    "pilot": PilotPolicy,
}


def _convert(field: dataclasses.Field, name: str, text: str) -> Any:
    kind = type(field.default)
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"--policy-arg {name}={text}: expected a {kind.__name__}") from None


def make_policy(name: str, args: dict[str, str] | None = None) -> Policy:
    """Build a policy from its CLI name (or ``module:callable``) and ``NAME=VALUE`` arguments.

    A ``module:callable`` that is a class is instantiated with the arguments as keyword strings
    and must have ``reset``/``act``; a plain function is called with the observation.
    """
    args = dict(args or {})
    if name in POLICIES:
        cls = POLICIES[name]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            known = ", ".join(fields) or "none"
            raise UsageError(f"--policy-arg {unknown[0]}: {name} has no such parameter ({known})")
        return cls(**{k: _convert(fields[k], k, v) for k, v in args.items()})
    if ":" not in name:
        choices = ", ".join(POLICIES)
        raise UsageError(f"--policy {name}: unknown policy; choose {choices} or module:callable")
    module_name, _, attr = name.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"--policy {name}: cannot import it ({error})") from None
    if isinstance(target, type):
        return target(**args)
    if args:
        raise UsageError(f"--policy {name}: a function policy takes no --policy-arg")
    return CallablePolicy(target)


def policy_params(policy: Policy) -> dict[str, Any]:
    """The policy's parameters, for the file attributes."""
    if dataclasses.is_dataclass(policy):
        return dataclasses.asdict(policy)
    return {}

"""The fast CarRacing: bit-identical to the stock env, registered, and checked by the collector."""

from __future__ import annotations

import math
import subprocess
import sys

import gymnasium as gym
import h5py
import numpy as np
import pygame
import pytest
from conftest import ROOT, run_cli
from gymnasium.utils.env_checker import check_env
from pygame import gfxdraw

import carsynth  # noqa: F401 - registers carsynth/CarRacingFast-v3
from carsynth.collect import CollectConfig, collect, make_policy
from carsynth.collect import workers as collect_workers
from carsynth.envs import (
    ENV_ID,
    CarRacingFast,
    covers_window,
    matches_stock,
    misses_window,
    rotate,
)


def make_pair(**kwargs) -> tuple[gym.Env, gym.Env]:
    """The stock env and the fast one, made through gymnasium the way users make them."""
    return gym.make("CarRacing-v3", **kwargs), gym.make(ENV_ID, **kwargs)


def drive_both(
    stock: gym.Env, fast: gym.Env, seed: int, steps: int, options: dict | None = None
) -> int:
    """Reset both with ``seed``, drive them with the pilot, assert every output is identical.

    The pilot acts on the stock env; both get its action. Returns the number of road tiles the
    car visited (each visit recolours a tile, which the fast renderer must show).
    """
    observations = [env.reset(seed=seed, options=options)[0] for env in (stock, fast)]
    np.testing.assert_array_equal(observations[1], observations[0], err_msg="reset")
    pilot = make_policy("pilot")
    pilot.reset(stock, np.random.default_rng(seed))
    for step in range(steps):
        if isinstance(stock.action_space, gym.spaces.Discrete):
            action = np.int64(step // 4 % 5)  # every discrete action, a few steps each
        else:
            action = pilot.act(stock, observations[0])
        results = [env.step(action) for env in (stock, fast)]
        observations = [result[0] for result in results]
        np.testing.assert_array_equal(observations[1], observations[0], err_msg=f"step {step}")
        assert results[1][1:4] == results[0][1:4], f"reward/flags at step {step}"
        if stock.render_mode is not None:
            np.testing.assert_array_equal(fast.render(), stock.render(), err_msg=f"render {step}")
        if results[0][2] or results[0][3]:
            break
    return stock.unwrapped.tile_visited_count


def test_same_frames_as_stock_over_several_tracks_with_the_pilot():
    # One env pair for all seeds: nothing of one track may survive into the next.
    stock, fast = make_pair()
    visited = [drive_both(stock, fast, seed, steps=250) for seed in (0, 1, 2)]
    assert min(visited) > 25  # the car drove along the road: many tiles changed colour
    assert isinstance(fast.unwrapped, CarRacingFast)


def test_same_frames_with_domain_randomisation():
    stock, fast = make_pair(domain_randomize=True)
    drive_both(stock, fast, seed=3, steps=120)
    drive_both(stock, fast, seed=4, steps=120)  # new colours
    drive_both(stock, fast, seed=5, steps=60, options={"randomize": False})  # colours kept


def test_same_rgb_array_renders_with_another_lap_complete_percent():
    # render() in rgb_array mode draws a second, 600x400 frame with the tyre marks (particles).
    stock, fast = make_pair(render_mode="rgb_array", lap_complete_percent=0.5)
    assert drive_both(stock, fast, seed=6, steps=120) > 20
    assert fast.render().shape == (400, 600, 3)
    assert fast.unwrapped.lap_complete_percent == 0.5


def test_same_frames_with_discrete_actions_and_state_pixels_mode():
    stock, fast = make_pair(continuous=False, render_mode="state_pixels")
    drive_both(stock, fast, seed=8, steps=80)


def test_same_frames_in_human_mode():
    # SDL's dummy video driver gives a display without a window; human mode ticks at 50 FPS.
    stock, fast = make_pair(render_mode="human")
    drive_both(stock, fast, seed=9, steps=20)
    surfaces = [pygame.surfarray.array3d(env.unwrapped.surf) for env in (stock, fast)]
    np.testing.assert_array_equal(surfaces[1], surfaces[0])
    for env in (stock, fast):
        env.close()


def test_envs_survive_pygame_quit_any_number_of_times():
    # Closing a human-mode env calls pygame.quit(), which kills every font; the fast env's cached
    # score font was rebuilt after the first quit only: from the second on, every new fast env
    # failed with "pygame.error: Invalid font". An env kept open across the quits (rgb_array)
    # must keep giving the stock frames too.
    stock, fast = make_pair(render_mode="rgb_array")
    for k in range(4):
        human = gym.make(ENV_ID, render_mode="human")
        human.reset(seed=k)
        human.step(np.array([0.0, 0.5, 0.0], dtype=np.float32))
        human.close()
        drive_both(stock, fast, seed=k, steps=3)
    pygame.font.quit()  # the font module alone, too
    drive_both(stock, fast, seed=5, steps=3)
    for _ in range(2):  # gymnasium's checker closes and renders its envs
        check_env(gym.make(ENV_ID, render_mode="rgb_array").unwrapped, skip_render_check=False)
        check_env(gym.make(ENV_ID).unwrapped)


# General angles, exact and near quarter turns (pygame rounds those within 1e-6 to exact ones),
# and angles outside [0, 2 pi) that pygame reduces with fmod.
ANGLES = [0.0, 1e-7, -1e-7, 0.3, -2.5, math.pi / 2, math.pi, -math.pi / 2, 4.712389, 2 * math.pi,
          7.1, -40.0, 1e5]  # fmt: skip


@pytest.mark.parametrize("angle", ANGLES)
def test_rotate_is_pygames_rotate_rad_bit_for_bit(angle):
    points = np.random.default_rng(0).normal(0, 300, size=(50, 2))
    expected = [tuple(pygame.math.Vector2(tuple(p)).rotate_rad(angle)) for p in points]
    assert rotate(points, angle).tolist() == [list(p) for p in expected]


def test_window_shortcuts_agree_with_what_gfxdraw_draws():
    # Squares of random size, angle and place around the window, drawn the stock way (outline,
    # then fill) on a grey window: "covers" must mean every pixel has the colour, "misses" that
    # none changed. Sizes and places are chosen so that both cases occur, near the margins too.
    rng = np.random.default_rng(1)
    width, height = 1000, 800
    surface = pygame.Surface((width, height))
    corners = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64)
    counts = {"covers": 0, "misses": 0}
    for _ in range(300):
        if rng.random() < 0.5:  # large, about the window's centre: covers it, or nearly
            half, centre = rng.uniform(600, 760), rng.uniform((380.0, 280.0), (620.0, 520.0))
        else:  # small, anywhere around the window: inside, across an edge or just outside
            half, centre = rng.uniform(5, 60), rng.uniform((-80.0, -80.0), (1080.0, 880.0))
        polygon = rotate(corners * half, rng.uniform(0, 2 * math.pi)) + centre
        surface.fill((50, 50, 50))
        gfxdraw.aapolygon(surface, polygon.tolist(), (200, 10, 10))
        gfxdraw.filled_polygon(surface, polygon.tolist(), (200, 10, 10))
        pixels = pygame.surfarray.array3d(surface)
        if covers_window(polygon):
            counts["covers"] += 1
            assert (pixels == (200, 10, 10)).all()
        if misses_window(polygon[None])[0]:
            counts["misses"] += 1
            assert (pixels == 50).all()
    assert min(counts.values()) > 10


def test_env_id_makes_the_fast_env_after_import_carsynth():
    code = (
        "import sys, gymnasium, carsynth\n"
        "assert 'pygame' not in sys.modules and 'Box2D' not in sys.modules\n"
        f"env = gymnasium.make('{ENV_ID}')\n"
        "import carsynth.collect.workers\n"
        "assert 'torch' not in sys.modules  # what a collect worker imports\n"
        "print(type(env.unwrapped).__name__, env.spec.max_episode_steps)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["CarRacingFast", "1000"]


def test_check_detects_a_renderer_that_draws_differently(monkeypatch):
    assert matches_stock()
    original = CarRacingFast._render_road

    def off_by_one_pixel(self, zoom, translation, angle):
        original(self, zoom, (translation[0] + 1.0, translation[1]), angle)

    monkeypatch.setattr(CarRacingFast, "_render_road", off_by_one_pixel)
    assert not matches_stock(steps=5)

    def changed_signature(self, zoom, translation):  # as if gymnasium changed its private API
        raise AssertionError("never called with these arguments")

    monkeypatch.setattr(CarRacingFast, "_render_road", changed_signature)
    assert not matches_stock(steps=5)


TINY = dict(episodes=1, workers=1, max_steps=60, skip_frames=50, progress=False)


def test_collect_falls_back_to_stock_with_one_warning_line(tmp_path, monkeypatch, capsys):
    fast = collect(CollectConfig(out=str(tmp_path / "fast.h5"), **TINY))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(collect_workers, "fast_renderer_matches", lambda: False)
    fallback = collect(CollectConfig(out=str(tmp_path / "fallback.h5"), **TINY))
    warning = capsys.readouterr().err.splitlines()
    assert len(warning) == 1
    assert warning[0].startswith("carsynth: warning: the fast renderer does not reproduce")
    assert warning[0].endswith("collecting with --renderer stock")
    with h5py.File(fast, "r") as a, h5py.File(fallback, "r") as b:
        assert (a.attrs["renderer"], b.attrs["renderer"]) == ("fast", "stock")
        assert a["frames"].shape == (10, 64, 64, 3)
        np.testing.assert_array_equal(a["frames"][:], b["frames"][:])
        np.testing.assert_array_equal(a["rewards"][:], b["rewards"][:])


def test_fast_renderer_reproduces_the_shipped_fixture(tmp_path, fixture_file):
    # The fixture was collected with the stock renderer (see README); its first two episodes
    # (shard 0 of 4 of the same 8-episode run) must come out the same, bit for bit.
    config = CollectConfig(
        out=str(tmp_path / "shard.h5"), episodes=8, shard=(0, 4), max_steps=250, seed=0,
        workers=1, renderer="fast", progress=False,
    )  # fmt: skip
    with h5py.File(collect(config), "r") as new, h5py.File(fixture_file, "r") as shipped:
        assert new.attrs["renderer"] == "fast"
        count = len(new["frames"])
        assert count == 400
        for name in ("frames", "actions", "rewards", "terminated", "truncated"):
            np.testing.assert_array_equal(new[name][:], shipped[name][:count], err_msg=name)


def test_cli_rejects_an_unknown_renderer(tmp_path):
    out = tmp_path / "x.h5"
    result = run_cli("collect", "--out", str(out), "--renderer", "opengl")
    assert result.returncode == 2
    assert result.stderr.startswith("carsynth: error:") and "--renderer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()

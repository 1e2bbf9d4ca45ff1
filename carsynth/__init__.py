"""carsynth: validated synthetic CarRacing frames for world-model pretraining.

The package follows the pipeline: ``envs`` (a fast CarRacing), ``collect`` (rollouts into a
frame file), ``storage`` (the HDF5 schema and the split), ``models``/``losses``/``training`` (the
DCGAN), ``rundir`` (a run directory), ``sampling``, ``metrics`` (NDB and nearest-neighbour
checks), ``validation`` (the gate and its report), ``export`` and ``data``; docs/architecture.md
draws it. Submodules are imported
on demand so that ``import carsynth`` stays cheap (collection workers never load torch).
"""

import gymnasium

__version__ = "0.1.0"

# The fast CarRacing (carsynth.envs) as a gymnasium id. The entry point is a string, so pygame and
# Box2D are imported only when the env is made, not by `import carsynth`.
if "carsynth/CarRacingFast-v3" not in gymnasium.registry:
    gymnasium.register(
        id="carsynth/CarRacingFast-v3",
        entry_point="carsynth.envs:CarRacingFast",
        max_episode_steps=1000,
        reward_threshold=900,
    )

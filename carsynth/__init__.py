"""carsynth: validated synthetic CarRacing frames for world-model pretraining.

The package follows the pipeline: ``storage`` (the HDF5 schema), ``envs`` (a fast CarRacing),
``collect`` (rollouts into a frame file), ``models``/``losses``/``train`` (the DCGAN),
``metrics`` (NDB and nearest-neighbour checks), ``export`` and ``data``. Submodules are imported
on demand so that ``import carsynth`` stays cheap (collection workers never load torch).
"""

__version__ = "0.1.0"

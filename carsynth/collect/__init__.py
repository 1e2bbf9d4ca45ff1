"""``carsynth collect``: CarRacing rollouts recorded into a frame file.

``policies`` decides the actions, ``frames`` makes the env and turns observations into frames,
``workers`` runs episodes in parallel and hands them to :mod:`carsynth.storage` in seed order.
"""

from carsynth.collect.frames import process_frame, road_fraction_near_car
from carsynth.collect.policies import POLICIES, make_policy
from carsynth.collect.workers import CollectConfig, collect, parse_shard

__all__ = [
    "POLICIES",
    "CollectConfig",
    "collect",
    "make_policy",
    "parse_shard",
    "process_frame",
    "road_fraction_near_car",
]

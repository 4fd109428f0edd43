"""The names of a demonstration frame's vector features, shared by the dataset, the simulator and the policy.

Cameras are named in capvector.bench.env.camera; a camera's image is "observation.images.<camera>" and its depth
map "observation.depth.<camera>".
"""

STATE_KEY = "observation.state"  # hand xyz and gripper opening
ACTION_KEY = "action"  # dx, dy, dz, gripper
# Privileged simulator facts, recorded for oracles and privileged auxiliary targets (never a learned policy's
# input at evaluation, unless it is an oracle): the manipulated object's xyz (Meta-World obs[4:7]) and the
# goal's (obs[36:39]).
PRIVILEGED_KEY = "observation.privileged"
PRIVILEGED_NAMES = ("object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z")
PRIVILEGED_DIM = len(PRIVILEGED_NAMES)

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
# Where those two points appear in each camera's image, for per-patch privileged targets: per camera (in
# capvector.bench.env.camera.CAMERAS order) and point (object, goal), the pixel column u and row v of the point's
# projection (pinhole model of capvector.bench.env.camera, pixel centres at integers, in the recorded image size)
# and its depth z in metres along the camera axis (z <= 0: behind the camera, u and v meaningless).
PIXELS_KEY = "observation.privileged_pixels"
PIXEL_POINTS = ("object", "goal")
PIXEL_FIELDS = ("u", "v", "z")

"""The frozen 3D teacher of the Spatial Forcing analog (VGGT's role), in LeRobot's policy-folder style:
configuration_teacher, modeling_teacher, its pretraining and the probe of what its features carry."""

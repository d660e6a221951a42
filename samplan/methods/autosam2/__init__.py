"""autosam2: a 3D U-Net with a SAM branch on a planned fraction of slices (AutoSAM2), trained end to end."""

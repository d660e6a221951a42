"""autosam2: a 3D U-Net with a SAM branch on a planned fraction of slices (AutoSAM2), trained end to end.

Defects of the reference code (nadavcohen98/3D-data-SAM) fixed here:
- SAM2 was called through its numpy predictor and the optimiser held the U-Net only, so the MRI-to-RGB mapper and
  the bridge never trained: SAM's modules are called in torch (sam_adapter.py) and the loss on SAM's mask logits
  trains the mapper, the bridge, the mask decoder and, through the bridge, the U-Net;
- the bridge's output only fed the prompt generator (its random channels read as class logits): it is added to
  SAM's image embedding, and prompts come from the U-Net's probabilities;
- BraTS channels and classes were assigned by position and mislabelled: they come from dataset.json by name, and
  regions (WT/TC/ET) through `regions_class_order`;
- the slice rule sent one slice at fraction 0 and divided by zero for six slices (slices.py);
- BCE was applied to probabilities and a sigmoid to probabilities in the fusion: losses take logits, the sigmoid
  is applied once.
"""

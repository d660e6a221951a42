"""Segment an image from Python with a trained samplan model; the label maps keep the image's geometry.

    python docs/python_api_example.py MODEL_DIR IMAGE OUTPUT

MODEL_DIR is a trained model folder, e.g. $SAMPLAN_RESULTS/Dataset004_Hippocampus/unet__samplanPlans__3d_fullres
(samplan_train writes it; samplan_install_model unpacks a shared one). IMAGE is a single-channel image file
(.nii.gz, .mha, .nrrd, ...); OUTPUT receives its label map, voxel for voxel what samplan_predict writes.
"""
import sys

import numpy as np
import SimpleITK as sitk

from samplan.inference.in_memory import array_properties, label_map_image, predict_sitk
from samplan.inference.predictor import Predictor

model_dir, image_file, output_file = sys.argv[1:4]

# load once, predict many times: every fold with a checkpoint_final.pth is ensembled
predictor = Predictor.from_model_dir(model_dir, progress=False)

# a SimpleITK image in, a SimpleITK label map out (same size, spacing, origin and direction)
image = sitk.ReadImage(image_file)
labels = predict_sitk(predictor, image)
sitk.WriteImage(labels, output_file)

# the same from a numpy array (numpy axis order z, y, x) with its geometry given explicitly:
# spacing in array order, origin and direction as SimpleITK reports them (x, y, z)
array = sitk.GetArrayFromImage(image)
properties = array_properties(spacing=image.GetSpacing()[::-1], origin=image.GetOrigin(),
                              direction=image.GetDirection())
seg = predictor.predict_array(array, properties=properties)  # (z, y, x) label values
seg_image = label_map_image(seg, properties)  # back to SimpleITK, e.g. to write with sitk.WriteImage

values, counts = np.unique(seg, return_counts=True)
print(f"{output_file}: voxels per label {dict(zip(values.tolist(), counts.tolist()))}; "
      f"numpy and SimpleITK results agree: {np.array_equal(seg, sitk.GetArrayFromImage(labels))}")

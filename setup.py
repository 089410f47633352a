from setuptools import find_packages, setup

setup(
    name="ssl_nnunet",
    version="0.1.0",
    description="Self-supervised pretraining for 3D medical images, done the nnU-Net way",
    python_requires=">=3.11",
    # The layout keeps plans/ and experiment_planning/ at the top of the repository; they are installed inside
    # the ssl_nnunet namespace (ssl_nnunet.plans, ssl_nnunet.experiment_planning) so they never collide with
    # another project's top-level "plans" or "experiment_planning".
    packages=find_packages(include=["ssl_nnunet", "ssl_nnunet.*"])
    + ["ssl_nnunet.experiment_planning", "ssl_nnunet.plans"],
    package_dir={"ssl_nnunet.experiment_planning": "experiment_planning", "ssl_nnunet.plans": "plans"},
    package_data={"ssl_nnunet.plans": ["*.json"]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",  # not imported here: timm (via dynamic-network-architectures) needs it; pinned to torch
        "nnunetv2==2.8.1",
        "nilearn",
        "tqdm",
        "matplotlib",
        "scipy",  # Wilcoxon signed-rank test of the fine-tuning report (already a dependency of nnunetv2)
    ],
    extras_require={"test": ["pytest", "tensorboard"], "tensorboard": ["tensorboard"]},
    entry_points={
        "console_scripts": [
            "ssl_nnunet_make_demo_dataset=ssl_nnunet.data.demo_dataset:main",
            "ssl_nnunet_make_dataset=ssl_nnunet.experiment_planning.make_dataset:main",
            "ssl_nnunet_extract_fingerprint=ssl_nnunet.experiment_planning.entrypoints:extract_fingerprint_entry",
            "ssl_nnunet_plan_experiment=ssl_nnunet.experiment_planning.entrypoints:plan_experiment_entry",
            "ssl_nnunet_preprocess=ssl_nnunet.experiment_planning.entrypoints:preprocess_entry",
            "ssl_nnunet_plan_and_preprocess=ssl_nnunet.experiment_planning.entrypoints:plan_and_preprocess_entry",
            "ssl_nnunet_pretrain=ssl_nnunet.training.run:main",
            "ssl_nnunet_export=ssl_nnunet.export.exporter:main",
            "ssl_nnunet_import=ssl_nnunet.export.nnssl_import:main",
            "ssl_nnunet_benchmark=ssl_nnunet.benchmark.cli:main",
            "ssl_nnunet_transfer=ssl_nnunet.export.transfer:main",
            "ssl_nnunet_finetune=ssl_nnunet.finetune.finetune:main",
            "ssl_nnunet_predict=ssl_nnunet.finetune.predict:main",
        ],
    },
)

"""ament_python / pip install script for pi_policy."""

from glob import glob

from setuptools import find_packages, setup

package_name = "pi_policy"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml")),
    ],
    python_requires=">=3.10",
    install_requires=[
        "numpy",
        "torch>=2.3",
        "safetensors",
        "sentencepiece",
        "opencv-python-headless",
        "pillow",  # JPEG / PNG camera frames (pi_policy.node.compressed)
        "pyyaml",
        "tqdm",
        "rosbags>=0.10",
        "matplotlib",
        "websockets>=13",  # pi-policy serve (the asyncio server API)
        "msgpack>=1.0",
    ],
    extras_require={
        # triton: the fused-kernel tests run under its CPU interpreter; ray[serve]: eval-bag --ray and serve --ray
        # are tested for real; openpi-client: `pi-policy serve` is tested against openpi's own client. It pins
        # numpy < 2, so this extra resolves numpy 1.26 and an OpenCV 4.x built for it (README: Quick start).
        "test": ["pytest", "transformers>=4.46", "onnx", "onnxruntime", "ruff", "triton", "ray[serve]",
                 "openpi-client"],
        "openpi": ["openpi-client"],
        "onnx": ["onnx", "onnxruntime"],
        "ray": ["ray"],
        "serve-ray": ["ray[serve]"],  # pi-policy serve --ray: Ray Serve, FastAPI, uvicorn
    },
    zip_safe=True,
    maintainer="pi_policy developers",
    maintainer_email="dev@pi-policy.invalid",
    description="Real-time pi0 / pi0.5 vision-language-action policies for ROS 2.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "pi-policy = pi_policy.tools.cli:main",
            "pi_policy_node = pi_policy.ros.node:main",
        ],
    },
)

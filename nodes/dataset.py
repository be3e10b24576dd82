"""MoA Save Training Example: a picture, its subjects and a caption appended to a training dataset."""
from __future__ import annotations

from ..moa_attention.comfyui.dataset_examples import save_training_example
from .common import CATEGORY, SUBJECTS_TYPE, check_finite, refusals

NODE = "MoA Save Training Example"


class MoASaveTrainingExample:
    DESCRIPTION = ("Builds a MoA training dataset from your pictures: appends this picture, its subjects' masks "
                   "and references and the caption to ComfyUI's output folder/<dataset_name>/ in the trainer's "
                   "manifest format (python -m moa_attention.train --data that folder). Never overwrites an "
                   "example; run it once per picture.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("example",)
    OUTPUT_TOOLTIPS = ("The saved example's picture, relative to the output folder "
                       "(e.g. my_dataset/images/000001.png).",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The training picture (one per run). Its subjects are segmented in it "
                                           "by the MoA Subject chain."}),
            "subjects": (SUBJECTS_TYPE, {"tooltip": "The subjects in the picture, from MoA Subject (chain several "
                                                   "through 'previous'). Give MoA Subject this picture and the "
                                                   "subject's mask: the mask is saved as the subject's mask and the "
                                                   "picture cropped to it as its reference. With other photos of "
                                                   "the subject, connect its 'region' with the mask in this picture."}),
            "caption": ("STRING", {"multiline": True, "default": "a photo of a person", "tooltip":
                                   "What the picture shows. It must contain every subject's class word, e.g. "
                                   "'a woman holding a cat' for subjects 'woman' and 'cat'."}),
            "dataset_name": ("STRING", {"default": "moa_dataset", "tooltip":
                                        "The dataset's folder name under ComfyUI's output folder (one plain name: "
                                        "no path separators, no '..'). Examples are appended to it."}),
        }}

    def save(self, image, subjects, caption, dataset_name):
        check_finite(NODE, image=image)
        with refusals(NODE):
            example = save_training_example(dataset_name, image, subjects, caption)
        return {"ui": {"text": [example]}, "result": (example,)}

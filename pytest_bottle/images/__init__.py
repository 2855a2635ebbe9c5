"""Images: recipes as data, the mmdebstrap builder and the content-addressed cache."""

from __future__ import annotations

from .cache import BuiltImage, ensure_image, find_image, list_images, prune_images, remove_image
from .image import Image, lookup
from .recipes import RECIPES, Recipe, get_recipe, register

__all__ = [
    "RECIPES",
    "BuiltImage",
    "Image",
    "Recipe",
    "ensure_image",
    "find_image",
    "get_recipe",
    "list_images",
    "lookup",
    "prune_images",
    "register",
    "remove_image",
]

"""One family of errors for everything MoA refuses.

Every refusal the user can act on is a MoAError whose message names the input and the fix.
Subclasses keep the builtin base a caller would naturally catch (ValueError for bad values,
RuntimeError for a broken environment), so code outside the pack needs no MoA import to
handle them. Nodes prefix the message with their own name through `with_prefix`, which keeps
the type and chains the original, instead of flattening everything to a bare ValueError.
"""
from __future__ import annotations


class MoAError(Exception):
    """Base of every error the pack raises on purpose."""

    def with_prefix(self, prefix: str) -> "MoAError":
        """The same error type, its message led by `prefix` (a node's name); chain it with `from self`."""
        text = str(self)
        if text.startswith(prefix):
            return self
        try:
            return type(self)(f"{prefix}: {text}")
        except TypeError:                      # a subclass with another constructor signature
            return MoAInputError(f"{prefix}: {text}")


class MoAInputError(MoAError, ValueError):
    """A node input or argument that MoA cannot use (range, shape, missing connection)."""


class AdapterFileError(MoAError, ValueError):
    """A MoA adapter file, or an adapter that does not fit the model; names the file and the fix."""


class ClassWordError(MoAError, ValueError):
    """A subject's class word cannot be bound to the prompt; the message shows the tokens."""


class SubjectImageError(MoAError, ValueError):
    """A subject's photos or masks cannot be used (shape, size, empty mask)."""


class ModelMismatchError(MoAError, ValueError):
    """The model, text encoder or image encoder is not the kind the adapter was made for."""

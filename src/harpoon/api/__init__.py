"""Protocol buffer messages harpoon speaks, generated from ../../../proto.

No logic lives here. Regenerate with `python -m harpoon.api.regen`; the test suite
fails when the committed code is stale.
"""

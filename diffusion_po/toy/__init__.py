"""The embedded toy world: procedural captioned scenes (`world`), a pixel oracle (`oracle`), the base
model builder (`build`), oracle-labelled Pick-a-Pic style pairs (`pairs`), the toy protocol and the DPO main job
(`experiment`), the other methods with that protocol (`methods`) and the Perp-Neg experiment (`perp_neg`).
See docs/toy.md."""

TEST_SEEDS = 8
"""Images per test caption of every toy evaluation by default (`--test-seeds`): the win rate compares each caption's
mean over them. Here, in a module without numpy or torch, so that `diffusion-po toy --help` stays fast."""

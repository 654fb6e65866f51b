"""The embedded toy world: procedural captioned scenes (`world`), a pixel oracle (`oracle`), the base
model builder (`build`), oracle-labelled Pick-a-Pic style pairs (`pairs`), the toy protocol and the DPO main job
(`experiment`), the other methods with that protocol (`methods`) and the Perp-Neg experiment (`perp_neg`).
See docs/toy.md."""

"""The embedded toy world: procedural captioned scenes (`world`), a pixel oracle (`oracle`), the base
model builder (`build`), oracle-labelled Pick-a-Pic style pairs (`pairs`) and the DPO main job
(`experiment`). See docs/toy.md."""

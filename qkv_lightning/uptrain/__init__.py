"""Uptraining: turning a trained model into another attention variant (:mod:`.surgery`, :mod:`.convert`) and
recovering it by a short fine-tune, optionally distilled from the original (:mod:`.distill`)."""

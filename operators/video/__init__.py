"""Stages of the streaming video job (MTTR referring video object segmentation).

A video is never decoded whole. The unit of work is the window of the reference pipeline (24
frames starting every 18, :func:`vbatch.models.rvos.plan_windows`)::

    manifest (driver, :mod:`.manifest`): one row per video, validated, queries checked
    → plan (:mod:`.plan`, CPU task per video): fetch the file once per node into a local cache
      (:func:`vbatch.operators.cache.localize_video`), read its frame count, timestamps and size
      with decord (no frame is decoded), emit one row per window
    → decode (:mod:`.decode`, CPU task per window): decode only that window's frames, resize them
      to the network's input size, ship them as uint8 ``.npy`` (≈17 MB for 24 frames at 640×360)
    → model (:mod:`.model_stage`, actor pool): one forward per window for all of the video's
      queries; returns the mask logits of the frames the window *owns* at stride 4
    → write (:mod:`.write`, CPU task per window): upsample + threshold the owned frames' logits to
      the original size, write ``frames/<video_id>/<query_index>/<frame_index>.png``, emit one
      result row per (query, owned frame)
    → render (:mod:`.render`, optional, one task per video): an MP4 with the masks overlaid

The overlap rule of the reference (a later window overwrites the frames it shares with an earlier
one) becomes an ownership rule: each frame belongs to the LAST window containing it
(:func:`vbatch.models.rvos.owned_frames`), so every frame is written exactly once, by whichever
worker has its window, in any order, and no reassembly step holds a video's masks.

Why decode in a CPU stage rather than in the actor: decoding overlaps with inference and the GPU
never waits on FFmpeg; shipping frames already resized to the network size (uint8, not the float
input) keeps a window's object at ≈17 MB whatever the source resolution. Why a node-local file
rather than the object's bytes: decord seeks in a file, so every window reads only its own frames,
and the object is downloaded once per node instead of once per window.
"""

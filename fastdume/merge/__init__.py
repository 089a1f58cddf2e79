"""Merging dense experts into a DUME model: upcycle, reading and checking the source checkpoints,
adding and removing experts later."""

"""BackBone_tvr configs (shallowdream66/BackBone_tvr @ 5bb74ad, README recipe): CLIP ViT-B/32 + seqTransf + WTI."""

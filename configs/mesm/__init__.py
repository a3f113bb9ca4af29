"""MESM configs (lntzm/MESM @ 8501bdea, config/*/*.json): one file per dataset; ``data.variant`` names the official
feature variant (config/charades/VGG_GloVe.json is ``--config charades --model mesm --set data.variant=VGG_GloVe``)."""

"""The Ray stages of vitray: ingest, pretrain, fine-tune, serve, tracking."""

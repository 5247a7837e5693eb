"""`kvgate report`: an offline HTML ops report from the gateway's JSONL access logs."""

"""Batch jobs: the OpenAI files and batches API, run on the capacity interactive traffic leaves idle.

files.py keeps uploaded and result files in a directory (one volume shared by every router); jobs.py keeps
job state (the batch objects, each line's result, leases) in Redis or in memory; lines.py validates an
input file with the edge's own checks; runner.py runs jobs line by line through the router's chat handler
at batch priority, only while replicas have room; api.py is the HTTP surface.
"""

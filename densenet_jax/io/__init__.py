"""Everything that reads or writes a run's files, local or gs://, in one place.

    storage.py, cloud.py          file operations on local paths and gs:// URLs alike; the GCS client and its errors
    checkpoints.py, integrity.py  orbax checkpoints of a run and of converted weights; their checksums
    lock.py, cloud_lock.py        one run per workdir (local and gs://); lock_record.py: what both record
    workdir.py                    the layout of a run's workdir, its recorded config, a full disk's paragraph
    loading.py                    load_model(path), load_variables(path), run_config(path): what a user points at

Nothing here imports the training loop, so loading weights for inference or analysis does not pull it in.
"""

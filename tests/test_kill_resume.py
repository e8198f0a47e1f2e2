"""The CI-sized run of benchmarks/kill_resume.py: two `kill -9`s (during a checkpoint write, during training)."""

from benchmarks import kill_resume

EPOCHS = 5  # the first kill lands in the first checkpoint write; 4 epochs remain, twice the second kill's window


def test_kill_9_during_a_checkpoint_write_and_during_training_then_resume_ends_like_an_uninterrupted_run(tmp_path):
  result = kill_resume.run(str(tmp_path / 'runs'), kills=2, epochs=EPOCHS, seed=0, warm_up=False, diverge=False,
                           modes=('checkpoint write', 'training'))
  # run() raises if a checkpoint is damaged, a step is logged twice or out of order, or the final metrics and
  # weights differ from the uninterrupted run's.
  assert result['kills'] == 2 and result['kills_by_mode'] == {'checkpoint write': 1, 'training': 1}
  steps = 11 * EPOCHS
  assert result['logged_train_steps'] == steps and result['final_metrics'].startswith(f'step={steps} eval_accuracy=')

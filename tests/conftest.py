"""Test-session setup: 8 fake CPU devices for the sharding tests, float32 matmuls, and the
``slow`` and ``gpu`` markers (pytest.ini) of the tests listed below.

``python -m pytest -m "not slow"`` is the developers' lane (under 2 minutes on 2 cores); CI runs
everything.  The tests of seconds each are listed here, in one table, rather than decorated in
their files: the lane is tuned in one place.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402
from helpers import GPU_SKIP_REASON  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# File -> names of its tests (without parameters) that take seconds each: subprocess runs of
# the runner or scripts, Pallas kernels in interpret mode, sharded and multi-device models.
SLOW = {
    "test_experiments.py": "*",
    "test_lm_eval.py": "*",
    "test_readme_commands.py": ("test_cpu_commands_run_as_written_in_a_fresh_checkout",),
    "test_kernels.py": ("test_triton_interpret_float32", "test_triton_interpret_unequal_blocks",
                        "test_triton_interpret_bfloat16", "test_mosaic_interpret",
                        "test_default_backend_on_cpu_interprets_the_triton_plan"),
    "test_runner.py": ("test_setup_test_run_trains_evaluates_checkpoints_and_converts",
                       "test_killed_run_resumes_and_matches_an_uninterrupted_run",
                       "test_two_process_pod_job_matches_one_process",
                       "test_the_same_command_again_with_a_relative_workdir_resumes",
                       "test_weights_that_do_not_fit_the_config_are_refused_before_the_run_starts",
                       "test_export_of_a_run_windows_by_its_rows_and_takes_long_inputs"),
    "test_bench_train.py": ("test_throughput_length_and_loss_check_parts",),
    "test_model.py": ("test_sharded_forward_and_gradients_match_single_device",
                      "test_attention_saving_policy_does_not_rerun_the_kernel_forward",
                      "test_blockwise_model_matches_reference_model",
                      "test_scan_over_layers_matches_unrolled_layers",
                      "test_converter_command_lines_with_memory_layers",
                      "test_hf_logits_and_exact_round_trip",
                      "test_memory_layer_attention_matches_per_row_loop"),
    "test_trainer.py": ("test_same_losses_on_one_device_and_on_8_device_meshes",
                        "test_chunked_loss_step_equals_full_logits_step",
                        "test_gradient_accumulation_equals_one_full_batch_step",
                        "test_console_logs_a_line_per_logged_step_and_a_summary_without_a_bar_"
                        "when_redirected",
                        "test_non_finite_updates_are_skipped_and_counted",
                        "test_console_shows_a_bar_on_a_terminal_with_the_lines_above_it"),
    "test_hf_training.py": ("test_gradients_equal_jax_cross_batch_training_model",
                            "test_trainer_gradient_accumulation_reports_the_same_loss",
                            "test_peft_lora_trains_five_windows_with_trainer_accumulation_"
                            "and_checkpointing"),
    "test_eval.py": ("test_passkey_end_to_end_jax_and_hf", "test_loss_by_position_end_to_end",
                     "test_readme_commands_read_a_runs_checkpoint",
                     "test_windows_default_to_the_trained_row_length"),
    "test_data.py": ("test_json_dataset_resumes_in_new_process_across_passes",),
    "test_data_errors.py": ("test_a_fresh_clone_journey_broken_data_fails_in_one_line",),
    "test_hf_fot.py": ("test_trust_remote_code_in_fresh_process",),
    "test_gguf.py": ("test_converted_gguf_matches_transformers_reading",),
    "test_cross_batch.py": ("test_legacy_call_matches_per_row_loop",
                            "test_blockwise_matches_reference"),
    "test_checkpoint.py": ("test_a_kill_during_a_save_leaves_the_last_good_checkpoint",),
    "test_signals.py": ("test_sigterm_saves_the_step_exits_143_and_the_command_resumes_exactly",
                        "test_a_signal_to_one_process_of_a_pod_job_stops_all_at_the_same_step",
                        "test_a_second_signal_exits_at_once",
                        "test_sigint_stops_after_the_step_and_the_same_run_resumes_exactly"),
    "test_packaging.py": ("test_the_install_imports_outside_the_checkout_with_the_model_files",
                          "test_each_command_resolves_in_the_install",
                          "test_the_train_command_runs_from_the_install"),
    "test_sharded_cross_batch.py": ("test_matches_one_device_and_keeps_rows_local",
                                    "test_mosaic_kernel"),
    "test_collectives.py": ("test_train_step_gathers_no_activation_along_the_batch",
                            "test_bench_train_prints_the_collectives_of_a_mesh"),
}
# Tests that need a GPU: skipped on other backends.
GPU = {
    "test_kernels.py": ("test_gpu_kernel",),
    "test_model.py": ("test_cudnn_attention_matches_xla_on_gpu",),
    "test_hf_windows.py": ("test_cuda_graph_decode_equals_eager_on_gpu",
                           "test_chunked_prefill_equals_window_by_window_on_gpu"),
}


def _listed(table, item):
    names = table.get(item.path.name, ())
    return names == "*" or item.originalname in names


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    for item in items:
        if _listed(SLOW, item):
            item.add_marker(pytest.mark.slow)
        if _listed(GPU, item):
            item.add_marker(pytest.mark.gpu)
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(pytest.mark.skip(reason=GPU_SKIP_REASON))

package org.quantface.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtException
import ai.onnxruntime.OrtSession
import android.content.res.AssetManager
import android.os.SystemClock
import java.nio.FloatBuffer

/** The execution providers the settings offer (values of @array/execution_provider_values). */
enum class ExecutionProvider(val label: String) {
    CPU("CPU"),
    NNAPI("NNAPI"),
    XNNPACK("XNNPACK"),
    QNN("QNN");

    companion object {
        fun fromSetting(value: String?): ExecutionProvider = entries.firstOrNull { it.name == value } ?: CPU
    }
}

/** What the user chose in the settings; a change means a new session. */
data class RuntimeChoice(val provider: ExecutionProvider, val threads: Int)

/**
 * One ONNX Runtime session on the packaged model, for one [RuntimeChoice]. Not thread-safe: the
 * view model calls it from one coroutine at a time.
 */
class Restorer private constructor(
    val manifest: ModelManifest,
    val choice: RuntimeChoice,
    private val env: OrtEnvironment,
    private val session: OrtSession,
    val loadMillis: Long,
) : AutoCloseable {

    /** The model on one (1, 3, S, S) input; returns its output and the milliseconds `run` took. */
    fun run(input: FloatBuffer): Pair<FloatBuffer, Long> {
        val start = SystemClock.elapsedRealtimeNanos()
        OnnxTensor.createTensor(env, input, manifest.inputShape).use { tensor ->
            session.run(mapOf(manifest.inputName to tensor)).use { result ->
                val value = result.get(manifest.outputName).orElseThrow {
                    ModelError("the model has no output named ${manifest.outputName}")
                }
                val output = (value as OnnxTensor).floatBuffer // a copy, valid after close
                return output to (SystemClock.elapsedRealtimeNanos() - start) / 1_000_000
            }
        }
    }

    override fun close() = session.close()

    companion object {
        /** Reads model.json and the model from [assets] and opens a session for [choice]. */
        fun load(assets: AssetManager, choice: RuntimeChoice): Restorer {
            val manifest = ModelManifest.fromAssets(assets)
            val model = ModelManifest.readModel(assets, manifest)
            val env = OrtEnvironment.getEnvironment()
            val start = SystemClock.elapsedRealtimeNanos()
            val session = OrtSession.SessionOptions().use { options ->
                configure(options, choice)
                try {
                    env.createSession(model, options)
                } catch (e: OrtException) {
                    throw ModelError("ONNX Runtime cannot open ${manifest.modelFile} with ${choice.provider.label}: ${e.message}")
                }
            }
            val millis = (SystemClock.elapsedRealtimeNanos() - start) / 1_000_000
            return Restorer(manifest, choice, env, session, millis)
        }

        private fun configure(options: OrtSession.SessionOptions, choice: RuntimeChoice) {
            options.setOptimizationLevel(OrtSession.SessionOptions.OptLevel.ALL_OPT)
            try {
                when (choice.provider) {
                    ExecutionProvider.CPU -> options.setIntraOpNumThreads(choice.threads)
                    ExecutionProvider.NNAPI -> {
                        options.setIntraOpNumThreads(choice.threads) // for the nodes NNAPI leaves to the CPU
                        options.addNnapi()
                    }
                    ExecutionProvider.XNNPACK -> {
                        // XNNPACK has its own thread pool; ORT's should then not spin beside it.
                        options.setIntraOpNumThreads(1)
                        options.addConfigEntry("session.intra_op.allow_spinning", "0")
                        options.addXnnpack(mapOf("intra_op_num_threads" to choice.threads.toString()))
                    }
                    ExecutionProvider.QNN -> {
                        if (BuildConfig.FLAVOR != "qnn") {
                            throw ModelError("QNN needs the app's qnn build (onnxruntime-android-qnn): " +
                                "install the qnnDebug / qnnRelease variant, or pick another provider in Settings")
                        }
                        options.setIntraOpNumThreads(choice.threads)
                        options.addQnn(mapOf("backend_path" to "libQnnHtp.so"))
                    }
                }
            } catch (e: OrtException) {
                throw ModelError("${choice.provider.label} is not available on this device or build: ${e.message}")
            }
        }
    }
}

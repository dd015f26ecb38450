package org.quantface.demo

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtException
import ai.onnxruntime.OrtSession
import android.content.Context
import android.content.res.AssetManager
import android.os.Build
import android.os.SystemClock
import android.util.Log
import java.io.File
import java.io.FileNotFoundException
import java.nio.FloatBuffer
import java.security.MessageDigest

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
 *
 * On QNN (the `qnn` flavour) it opens the package's offline-compiled context for this phone's SoC
 * when there is one ([QnnContextPicker]: `Build.SOC_MODEL` against model.json's `qnn_contexts`, both
 * files' sha256 checked), copied with its binary into no-backup storage so that ONNX Runtime finds
 * the binary beside the model; otherwise, or if that context does not load, the plain .ort / .onnx.
 */
class Restorer private constructor(
    val manifest: ModelManifest,
    val choice: RuntimeChoice,
    private val env: OrtEnvironment,
    private val session: OrtSession,
    val loadMillis: Long,
    /** On QNN: the context opened, or the plain graph and why; null on the other providers. */
    val qnnModel: QnnModelChoice?,
) : AutoCloseable {

    /** The provider as the screen shows it: "CPU", …, "QNN (context SM8650)", "QNN (plain graph)". */
    val providerLabel: String get() = qnnModel?.let { QnnContextPicker.label(it) } ?: choice.provider.label

    /** One sentence when QNN runs the plain graph (no context for this phone, or it failed), else null. */
    val note: String? get() = (qnnModel as? QnnModelChoice.Plain)?.reason

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
        private const val TAG = "QuantFace"

        /** Reads model.json and the model from [context]'s assets and opens a session for [choice]. */
        fun load(context: Context, choice: RuntimeChoice): Restorer {
            val assets = context.assets
            val manifest = ModelManifest.fromAssets(assets)
            val env = OrtEnvironment.getEnvironment()
            val start = SystemClock.elapsedRealtimeNanos()
            var qnnModel: QnnModelChoice? = null
            val session = OrtSession.SessionOptions().use { options ->
                configure(options, choice)
                var opened: OrtSession? = null
                if (choice.provider == ExecutionProvider.QNN) {
                    val dir = File(context.noBackupFilesDir, "qnn").apply { deleteRecursively(); mkdirs() }
                    val socModel = if (Build.VERSION.SDK_INT >= QnnContextPicker.SOC_MODEL_API) Build.SOC_MODEL else null
                    val picked = QnnContextPicker.pick(manifest.qnnContexts, Build.VERSION.SDK_INT, socModel) { name ->
                        copyAsset(assets, name, File(dir, name))
                    }
                    qnnModel = picked
                    if (picked is QnnModelChoice.Context) {
                        try {
                            opened = env.createSession(File(dir, picked.context.modelFile).path, options)
                        } catch (e: OrtException) {
                            qnnModel = QnnContextPicker.loadFailed(picked.context, e.message)
                        }
                    }
                    val plain = qnnModel as? QnnModelChoice.Plain
                    Log.i(TAG, plain?.reason ?: "QNN runs the context for this phone's SoC ${socModel.orEmpty()} " +
                        "(${(picked as QnnModelChoice.Context).context.modelFile}).")
                }
                opened ?: try {
                    env.createSession(ModelManifest.readModel(assets, manifest), options)
                } catch (e: OrtException) {
                    throw ModelError("ONNX Runtime cannot open ${manifest.modelFile} with ${choice.provider.label}: ${e.message}")
                }
            }
            val millis = (SystemClock.elapsedRealtimeNanos() - start) / 1_000_000
            return Restorer(manifest, choice, env, session, millis, qnnModel)
        }

        /** Copies the asset [name] to [dest] (temp file, then rename); its hex sha256, or null if there is no such asset. */
        private fun copyAsset(assets: AssetManager, name: String, dest: File): String? {
            val digest = MessageDigest.getInstance("SHA-256")
            val temp = File(dest.parentFile, dest.name + ".tmp")
            try {
                assets.open(name).use { input ->
                    temp.outputStream().use { output ->
                        val buffer = ByteArray(1 shl 16)
                        while (true) {
                            val n = input.read(buffer)
                            if (n < 0) break
                            digest.update(buffer, 0, n)
                            output.write(buffer, 0, n)
                        }
                    }
                }
            } catch (e: FileNotFoundException) {
                temp.delete()
                return null
            }
            if (!temp.renameTo(dest)) throw ModelError("cannot write $dest for the QNN context")
            return digest.digest().joinToString("") { "%02x".format(it) }
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

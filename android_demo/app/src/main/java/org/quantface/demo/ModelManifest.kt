package org.quantface.demo

import android.content.res.AssetManager
import org.json.JSONException
import org.json.JSONObject
import java.io.FileNotFoundException
import java.security.MessageDigest

/** A problem with the packaged model (missing, stale, not for this app), shown to the user as is. */
class ModelError(message: String) : Exception(message)

/**
 * What the app needs from model.json, the file `quantface package` writes next to the model
 * (quantface/package.py). Every key read here is checked against a packaged folder by
 * tests/test_package.py, so keep reading them as `json.getX("key")` or `<var>.getX("key")` with
 * `val <var> = json.getJSONObject("key")`.
 */
data class ModelManifest(
    val modelFile: String,
    val format: String,
    val sha256: String,
    val bytes: Long,
    val profile: String,
    val workingSize: Int,
    val inputName: String,
    val inputShape: LongArray,
    val outputName: String,
    val bitsSummary: String,
    val toolVersion: String,
    /** model.json's `qnn_contexts` (`quantface package --qnn-context`); empty when it has none or predates them. */
    val qnnContexts: List<QnnContext> = emptyList(),
) {
    companion object {
        /** The asset `quantface package --into-app` writes; it names the model file. */
        const val MODEL_JSON_ASSET = "model.json"

        fun parse(text: String): ModelManifest {
            try {
                val json = JSONObject(text)
                val input = json.getJSONObject("input")
                val output = json.getJSONObject("output")
                val contract = json.getJSONObject("contract")
                val quantization = json.getJSONObject("quantization")
                val shapeArray = input.getJSONArray("shape")
                val shape = LongArray(shapeArray.length()) { shapeArray.getLong(it) }
                val size = json.getInt("working_size")
                val version = contract.getInt("version")
                if (version != FaceContract.VERSION) {
                    throw ModelError(
                        "The model was packaged for pre/post-processing contract v$version; this app implements " +
                            "v${FaceContract.VERSION}. Package it with a matching quantface version."
                    )
                }
                val layout = input.getString("layout")
                if (layout != "NCHW" || !shape.contentEquals(longArrayOf(1, 3, size.toLong(), size.toLong()))) {
                    throw ModelError("model.json describes a $layout input of shape ${shape.contentToString()}; " +
                        "this app needs NCHW (1, 3, $size, $size)")
                }
                return ModelManifest(
                    modelFile = json.getString("model_file"),
                    format = json.getString("format"),
                    sha256 = json.getString("sha256"),
                    bytes = json.getLong("bytes"),
                    profile = json.getString("profile"),
                    workingSize = size,
                    inputName = input.getString("name"),
                    inputShape = shape,
                    outputName = output.getString("name"),
                    bitsSummary = quantization.getString("summary"),
                    toolVersion = json.getString("tool_version"),
                    qnnContexts = qnnContexts(json),
                )
            } catch (e: JSONException) {
                throw ModelError("model.json is not what `quantface package` writes: ${e.message}")
            }
        }

        /** The `qnn_contexts` entries; a model.json from before they existed has none. */
        private fun qnnContexts(json: JSONObject): List<QnnContext> {
            val contexts = json.optJSONArray("qnn_contexts") ?: return emptyList()
            return List(contexts.length()) { i ->
                val entry = contexts.getJSONObject(i)
                QnnContext(
                    soc = entry.getString("soc"),
                    marketing = entry.getString("marketing"),
                    socModel = entry.getInt("soc_model"),
                    htpArch = entry.getInt("htp_arch"),
                    modelFile = entry.getString("model_file"),
                    modelSha256 = entry.getString("model_sha256"),
                    binaryFile = entry.getString("binary_file"),
                    binarySha256 = entry.getString("binary_sha256"),
                    binaryBytes = entry.getLong("binary_bytes"),
                )
            }
        }

        /** model.json from the app's assets, or a [ModelError] saying how to add one. */
        fun fromAssets(assets: AssetManager): ModelManifest {
            val text = try {
                assets.open(MODEL_JSON_ASSET).bufferedReader().use { it.readText() }
            } catch (e: FileNotFoundException) {
                throw ModelError(
                    "No model in this build. Package one into the app's assets with\n" +
                        "quantface package --onnx MODEL.onnx --out DIR --into-app\nand rebuild."
                )
            }
            return parse(text)
        }

        /** The model file model.json names, checked against its size and sha256. */
        fun readModel(assets: AssetManager, manifest: ModelManifest): ByteArray {
            val bytes = try {
                assets.open(manifest.modelFile).use { it.readBytes() }
            } catch (e: FileNotFoundException) {
                throw ModelError("model.json names ${manifest.modelFile}, which is not in the app's assets")
            }
            val digest = MessageDigest.getInstance("SHA-256").digest(bytes).joinToString("") { "%02x".format(it) }
            if (bytes.size.toLong() != manifest.bytes || digest != manifest.sha256) {
                throw ModelError("${manifest.modelFile} does not match model.json (size or sha256): package it again")
            }
            return bytes
        }
    }

    override fun equals(other: Any?): Boolean =
        other is ModelManifest && other.sha256 == sha256 && other.modelFile == modelFile

    override fun hashCode(): Int = sha256.hashCode()
}
